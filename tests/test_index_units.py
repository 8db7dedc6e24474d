"""Small pieces of the index: factory choice, shard plans, threads, top-k helpers."""

from __future__ import annotations

import numpy as np
import pytest

from scatlas.atlas.errors import InputError
from scatlas.index.device import resolve_threads
from scatlas.index.evaluate import drop_self, recall_at_k
from scatlas.index.factory import auto_factory, choose_nlist, choose_pq_m, resolve_factory
from scatlas.index.progress import bar_disabled, progress_bar
from scatlas.index.sampling import sample_sorted
from scatlas.index.source import ArrayVectorSource, plan_over_ranges


def test_auto_factory_flat_below_the_crossover_and_ivfpq_above():
    assert auto_factory(100_000, 128) == "IDMap2,Flat" and auto_factory(100_001, 128).startswith("IVF")
    assert auto_factory(200_000, 50) == "IDMap2,Flat" and auto_factory(20_000, 1280).startswith("PCAR256,IVF")
    assert auto_factory(2_000_000, 128).startswith("IVF") and ",PQ" in auto_factory(2_000_000, 128)
    assert auto_factory(2_000_000, 1280).startswith("PCAR256,IVF")
    assert choose_nlist(1_000_000) == 4096 and choose_nlist(36_000_000) == 16384 and choose_nlist(100) == 16
    assert choose_pq_m(50) == 50 and choose_pq_m(128) == 64 and choose_pq_m(16) == 16 and choose_pq_m(67) is None
    assert auto_factory(2_000_000, 67).startswith("PCAR64,")
    assert resolve_factory("Flat", 10, 8) == "IDMap2,Flat" and resolve_factory("IVF16,Flat", 10, 8) == "IVF16,Flat"


def test_shard_plans_follow_cell_counts_across_ranges_and_holes():
    specs = plan_over_ranges([(0, 5), (10, 12), (20, 27)], 4)
    assert [(s.start, s.stop, s.n) for s in specs] == [(0, 4, 4), (4, 21, 4), (21, 25, 4), (25, 27, 2)]
    assert sum(s.n for s in specs) == 14
    with pytest.raises(InputError):
        plan_over_ranges([(0, 5), (3, 8)], 4)
    src = ArrayVectorSource(np.ones((7, 2)), ids=np.array([1, 3, 4, 9, 10, 11, 30]))
    specs = src.shard_plan(3)
    assert [(s.start, s.stop, s.n) for s in specs] == [(1, 9, 3), (9, 30, 3), (30, 31, 1)]
    got = [ids.tolist() for s in specs for ids, _ in src.iter_vectors(s, 2)]
    assert got == [[1, 3], [4], [9, 10], [11], [30]]
    with pytest.raises(InputError, match="strictly increasing"):
        ArrayVectorSource(np.ones((2, 2)), ids=np.array([3, 1]))


def test_threads_come_from_argument_env_or_cores(monkeypatch):
    monkeypatch.setenv("SCATLAS_THREADS", "3")
    assert resolve_threads(None) == 3 and resolve_threads(1) == 1
    monkeypatch.setenv("SCATLAS_THREADS", "x")
    with pytest.raises(InputError, match="SCATLAS_THREADS"):
        resolve_threads(None)
    monkeypatch.delenv("SCATLAS_THREADS")
    assert resolve_threads(None) >= 1


def test_drop_self_and_recall():
    ids = np.array([[5, 1, 2], [7, 8, 3]])
    scores = np.array([[1.0, 0.9, 0.8], [0.9, 0.8, 0.7]])
    out_ids, out_scores = drop_self(ids, scores, np.array([5, 3]), 2)
    assert out_ids.tolist() == [[1, 2], [7, 8]] and out_scores.tolist() == [[0.9, 0.8], [0.9, 0.8]]
    assert recall_at_k(np.array([[1, 2], [9, 9]]), np.array([[2, 1], [7, 8]])) == 0.5


def test_progress_bars_show_on_a_terminal_only_unless_forced():
    import io

    assert bar_disabled(True) is None and bar_disabled(False) is True and bar_disabled("always") is False
    piped = io.StringIO()  # not a TTY: no bar, no blank lines
    with progress_bar(True, total=3, file=piped) as bar:
        bar.update(3)
    assert piped.getvalue() == ""
    with progress_bar("always", total=3, file=piped) as bar:
        bar.update(3)
    assert "3/3" in piped.getvalue()


def test_sample_sorted_draws_without_replacement_and_takes_all_when_n_covers_it():
    got = sample_sorted(100, 10, 3)
    assert got.dtype == np.int64 and len(np.unique(got)) == 10 and (np.diff(got) > 0).all()
    assert (got == sample_sorted(100, 10, 3)).all()  # seeded
    assert (sample_sorted(5, 10, 0) == np.arange(5)).all()
    items = np.array([40, 10, 30, 20])
    assert (sample_sorted(items, 9, 0) == [10, 20, 30, 40]).all()
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    sample_sorted(items, 4, rng)  # covers the population: no draw, the generator does not advance
    assert rng.bit_generator.state == before
    assert set(sample_sorted(items, 2, rng)) <= set(items.tolist())
