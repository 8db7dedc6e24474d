"""The fast pass of :class:`query.hunt.kernels.BlockScorer`: candidates compared in the kernel's own dtype."""

from __future__ import annotations

import numpy as np
import pytest

from scatlas.query.hunt.classifier import exact_scores
from scatlas.query.hunt.kernels import BlockScorer


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("lower", [0.1, -0.1, 1.0 + 2.0**-12, 3.14159, -7.77, 1e5, -1e5, 2.0**-30, 70000.0])
def test_lower_rounded_down_to_the_kernel_dtype_loses_no_value(dtype, lower):
    scorer = BlockScorer(np.ones(4, dtype=np.float32), 0.0, 0.0)
    scorer.margin = 0.0
    scorer.cutoff = lower
    low = scorer._lower_as(np.dtype(dtype))
    assert low <= lower
    with np.errstate(over="ignore"):
        above = np.nextafter(dtype(low), dtype(np.inf))
    assert float(above) > lower or float(above) == np.inf or low == float(np.finfo(dtype).max)


@pytest.mark.parametrize("kernel", ["c16", "fp16", "fp32"])
@pytest.mark.parametrize("bias", [0.0, 37.5, -1234.0])
def test_hits_are_exact_when_the_cut_falls_between_float16_values(kernel, bias):
    rng = np.random.default_rng(7)
    x16 = _unit(rng.standard_normal((5000, 48))).astype(np.float16)
    w = (rng.standard_normal(48) * 2).astype(np.float32)
    exact = exact_scores(x16, w, bias)
    for q in (0.3, 0.9, 0.999):
        cut = float(exact[np.argsort(exact)[int(q * len(exact))]])  # a cut exactly on a row's score
        scorer = BlockScorer(w, bias, cut, kernel=kernel)
        res = scorer.hits(x16)
        want = np.flatnonzero(exact >= np.float32(cut))
        np.testing.assert_array_equal(res.rows, want)
        np.testing.assert_array_equal(res.scores, exact[want])
        fast = scorer.fast_scores(x16).numpy()
        np.testing.assert_array_equal(scorer.candidates(x16), np.flatnonzero(fast >= scorer._lower_as(
            np.dtype(np.float16 if kernel == "fp16" else np.float32))))


def test_candidates_of_an_empty_block():
    scorer = BlockScorer(np.ones(8, dtype=np.float32), 0.0, 1.0)
    res = scorer.hits(np.zeros((0, 8), dtype=np.float16))
    assert len(res.rows) == 0 and res.n_candidates == 0


def test_compiled_kernel_matches_float64_on_every_path():
    """The AVX2/F16C path and the portable loop, odd dimensions, several threads, non-contiguous input refused."""
    from scatlas.query.hunt import fp16dot

    if not fp16dot.available():
        pytest.skip("the compiled kernel is not built here")
    rng = np.random.default_rng(3)
    for d in (1, 7, 8, 15, 16, 50, 128, 1281):
        x = rng.standard_normal((9001, d)).astype(np.float16)
        w = rng.standard_normal(d).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64)
        tol = 1e-5 * np.sqrt(d) * np.abs(w).max() * 8
        for simd in ({True, False} if fp16dot.simd() else {False}):
            for threads in (1, 3):
                got = fp16dot.matvec(x, w, threads=threads, use_simd=simd)
                assert got.dtype == np.float32 and np.abs(got - want).max() <= tol, (d, simd, threads)
    x = rng.standard_normal((100, 16)).astype(np.float16)
    with pytest.raises(ValueError, match="C-contiguous"):
        fp16dot.matvec(x[:, :8], np.ones(8, np.float32))
    special = np.array([[np.inf, 0, 6.1e-5, -6e-8, 65504]], dtype=np.float16)  # inf, subnormals, max
    got = fp16dot.matvec(special, np.ones(5, np.float32), use_simd=False)
    assert got[0] == np.inf
    fin = special[:, 1:]
    np.testing.assert_allclose(fp16dot.matvec(np.ascontiguousarray(fin), np.ones(4, np.float32), use_simd=False),
                               fin.astype(np.float64).sum(axis=1), rtol=1e-6)
