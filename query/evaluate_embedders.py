"""Which embedder works best on this atlas? :func:`evaluate_embedders` (``scatlas evaluate``).

For each embedder and each of up to ``max_holdouts`` groups of the holdout column (``dataset_id``, ``donor_id``,
...), the group is held out and everything is done as for a new dataset: the embedder is fitted on a sample of the
**other** cells only, an index is built over them only (the build's shard tasks, on the executor given), the label
head is trained on them only, and the held-out cells are then embedded with that index's embedder and measured.
The held-out cells are never in the index searched for them, in the heads that label them, nor in the embedder's
fit (``embedder_saw_holdout`` is false in the JSON). That costs one build per embedder and group, which is why
``max_holdouts`` bounds it; groups are those with at least ``min_group_cells`` labelled cells, largest first.

Figures (per group, then averaged over the groups, each group counting once):

* ``knn_macro_f1`` / ``knn_accuracy``: label transfer to the held-out cells by the neighbours' vote
  (:func:`query.annotate` with ``predictor="knn"``, ``min_confidence=0``, as annotate runs by default otherwise:
  the query shifted onto the atlas by MNN pairs). Macro-F1 over the held-out cells' labels the rest of the atlas
  has (:func:`query.evaluate_labels`; labels only the held-out group has are left out and counted in
  ``labels_absent_from_atlas``).
* ``knn_unaligned_macro_f1``: the same vote without the MNN shift: what the embedding itself carries.
* ``heads_macro_f1`` / ``heads_accuracy``: the same with the label head trained on the rest (``predictor="heads"``;
  None with ``heads=False``). Training the heads also stores the label classes (values merged by Cell Ontology
  term, as ``build`` does); with ``heads=False`` the index has none and the vote runs on the raw label values
  (the same unless two values share a term).
* ``batch_mixing``: how well held-out cells intermingle with atlas cells in the embedding (an iLISI-like share). ``m``
  held-out and ``m`` atlas cells are sampled (``m`` = the smaller side, at most ``mixing_cells``) and pooled; for
  each pooled cell, the share of its ``k`` nearest pooled cells (cosine, itself excluded) that come from the other
  side, divided by the share expected if sides were mixed at random (``m / (2m - 1)``), averaged over both sides and
  capped at 1. 1: the group is as mixed with the atlas as cells are among themselves; 0: it forms its own island.
  Cell types one side lacks lower it, as in any iLISI.
* ``label_conservation``: k-NN label agreement within the atlas: for up to ``conservation_cells`` labelled atlas
  cells (of the rest), the share of their ``k`` nearest atlas cells (itself excluded) with the same label, averaged
  per label, then over labels (each label counts once).
* ``hunt_recall`` / ``hunt_precision``: for each label under ``rare_fraction`` of the rest's labelled cells (with at
  least ``min_rare_train`` cells there and ``min_rare_heldout`` in the held-out sample; at most ``max_rare_types``,
  rarest first), a hunt classifier (:func:`query.hunt.train` with ``positive_sql`` over the rest) scores the
  held-out cells' vectors; recall of the held-out cells of that label at the classifier's threshold, and precision
  among the held-out cells it calls; averaged over labels. None where the atlas has no such label.
* ``fit_seconds_per_1k``, ``build_seconds_per_1k`` (fit + index build, per 1,000 indexed cells),
  ``heads_seconds``, ``embed_seconds_per_1k`` (embedding the held-out cells, reading excluded).

Writes ``OUT/evaluation.json`` (``{"embedders": [{"embedder": ..., figures, "holdouts": [...]}, ...],
"settings": {...}}``), ``OUT/evaluation.png`` (bar charts) and ``OUT/evaluation.html``. The per-group indexes are
built under ``OUT/work/`` and removed once measured (``keep_indexes`` keeps them).
"""

from __future__ import annotations

import html
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.embed.base import CellReads
from scatlas.atlas.errors import InputError, TooFewCellsError
from scatlas.atlas.outputs import OutputKind, check_output_file, claim_output_dir, writing
from scatlas.atlas.sql import quote_ident, quote_literal
from scatlas.index import (
    DEFAULT_K,
    AtlasIndex,
    BuildConfig,
    Executor,
    Progress,
    ShardSpec,
    build_from_source,
    cell_reads,
    l2_normalize,
    progress_bar,
    sample_sorted,
    train_label_heads,
)

logger = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
PAGE_FILE = "evaluation.html"
FIGURE_FILE = "evaluation.png"
WORK_DIR = "work"
EVALUATION = OutputKind("embedder-evaluation", "an embedder evaluation", ((EVALUATION_FILE,), (WORK_DIR,)),
                        entries=frozenset({EVALUATION_FILE, PAGE_FILE, FIGURE_FILE, WORK_DIR}))

FIGURES: tuple[tuple[str, str], ...] = (
    ("knn_macro_f1", "k-NN vote macro-F1"),
    ("knn_unaligned_macro_f1", "k-NN vote macro-F1, no MNN shift"),
    ("heads_macro_f1", "label head macro-F1"),
    ("batch_mixing", "batch mixing (iLISI-like)"),
    ("label_conservation", "label conservation"),
    ("hunt_recall", "rare-type hunt recall"),
    ("build_seconds_per_1k", "fit + build s / 1,000 cells"),
    ("embed_seconds_per_1k", "embed s / 1,000 cells"),
)
"""The figures averaged over holdouts, with their labels on the page and the chart."""
_AVERAGED = (*(name for name, _ in FIGURES), "knn_accuracy", "heads_accuracy", "hunt_precision",
             "fit_seconds_per_1k", "heads_seconds")


@dataclass(frozen=True)
class EvaluationSettings:
    """What :func:`evaluate_embedders` measures and how (recorded in the JSON as ``settings``)."""

    label_key: str = "cell_type"
    holdout_key: str = "dataset_id"
    max_holdouts: int = 3
    min_group_cells: int = 20
    k: int = DEFAULT_K
    fit_sample: int = 50_000
    max_query_cells: int = 5_000
    mixing_cells: int = 1_000
    conservation_cells: int = 2_000
    heads: bool = True
    hunt: bool = True
    rare_fraction: float = 0.02
    min_rare_train: int = 10
    min_rare_heldout: int = 3
    max_rare_types: int = 3
    hunt_background: int = 5_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_holdouts", "min_group_cells", "k", "fit_sample", "max_query_cells", "mixing_cells",
                     "conservation_cells", "min_rare_train", "min_rare_heldout", "max_rare_types", "hunt_background"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 < self.rare_fraction < 1:
            raise InputError(f"rare_fraction must be between 0 and 1 (got {self.rare_fraction})")


@dataclass
class _Cells:
    """The committed cells of the store: ids (sorted), holdout group and label (None: missing) of each."""

    ids: np.ndarray
    group: np.ndarray  # object: str or None
    label: np.ndarray  # object: str or None

    def label_of(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.ids, ids)
        pos = np.clip(pos, 0, max(len(self.ids) - 1, 0))
        found = (self.ids[pos] == ids) if len(self.ids) else np.zeros(len(ids), dtype=bool)
        out = np.full(len(ids), None, dtype=object)
        out[found] = self.label[pos[found]]
        return out


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, t0: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0


# -- the rest of the atlas as a vector source -----------------------------------------------------------------------


class RestSource:
    """The store's cells ``ids`` (sorted) embedded by ``embedder``: an :class:`index.VectorSource` over part of the
    store (the atlas minus a held-out group). Pickles as "reopen the store at its path" (Ray)."""

    def __init__(self, store: Any, embedder: Any, ids: np.ndarray) -> None:
        self.store, self.embedder = store, embedder
        self.ids = np.asarray(ids, dtype=np.int64)
        self._reads = cell_reads(embedder, "atlas")

    @property
    def n_cells(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    def shard_plan(self, shard_size: int) -> list[ShardSpec]:
        if shard_size < 1:
            raise InputError(f"shard_size must be positive (got {shard_size})")
        return [ShardSpec(no, int(self.ids[a]), int(self.ids[min(a + shard_size, len(self.ids)) - 1]) + 1,
                          min(shard_size, len(self.ids) - a))
                for no, a in enumerate(range(0, len(self.ids), shard_size))]

    def chunks(self, ids: np.ndarray, chunk_size: int) -> Iterator[CellChunk]:
        """The cells ``ids`` (sorted, a subset of this source's) as chunks: contiguous runs read as slices."""
        yield from read_chunks(self.store, ids, chunk_size, self._reads)

    def iter_vectors(self, spec: ShardSpec, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        lo, hi = np.searchsorted(self.ids, [spec.start, spec.stop])
        for chunk in self.chunks(self.ids[lo:hi], chunk_size):
            yield np.asarray(chunk.ids, dtype=np.int64), self.embedder.transform(chunk)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        ids = sample_sorted(self.ids, n, seed).astype(np.int64)
        parts = [(c.ids, self.embedder.transform(c)) for c in self.chunks(ids, 20_000)]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return (np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in parts]),
                np.concatenate([v for _, v in parts]).astype(np.float32, copy=False))

    @property
    def accelerated(self) -> bool:
        return bool(self.embedder.accelerated) and getattr(self.embedder, "device", "auto") != "cpu"

    def on_device(self, device: str) -> RestSource:
        embedder = self.embedder.on_device(device)
        return self if embedder is self.embedder else RestSource(self.store, embedder, self.ids)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen_rest_source, (str(self.store.path), self.embedder, self.ids))

    def describe(self) -> dict[str, Any]:
        snap = {k: v for k, v in self.store.snapshot().items() if k not in ("path", "store_id")}
        digest = int(np.bitwise_xor.reduce(self.ids * 2654435761 % (2**31))) if len(self.ids) else 0
        return {"kind": "atlas-part", "n_cells": self.n_cells, "dim": self.dim, "ids": digest, "snapshot": snap}


def _reopen_rest_source(path: str, embedder: Any, ids: np.ndarray) -> RestSource:
    from scatlas.atlas.store import AtlasStore

    return RestSource(AtlasStore.open(path), embedder, ids)


def read_chunks(store: Any, ids: np.ndarray, chunk_size: int, reads: CellReads) -> Iterator[CellChunk]:
    """Chunks of the store's cells ``ids`` (sorted, unique) with what ``reads`` says (:func:`index.embedding.
    cell_reads`): runs of consecutive ids are read as slices."""
    if not len(ids):
        return
    what = {"with_X": reads.x, "obsm_keys": reads.obsm, "obs_columns": reads.obs}
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    if len(breaks) > 64:  # scattered cells (a donor held out across datasets): point reads
        yield from store.read_cells(ids, chunk_size=chunk_size, **what)
        return
    for run in np.split(ids, breaks):
        yield from store.iter_chunks(start=int(run[0]), stop=int(run[-1]) + 1, chunk_size=chunk_size, **what)


# -- the evaluation -----------------------------------------------------------------------------------------------


def evaluate_embedders(
    atlas: str | Path,
    out: str | Path,
    embedders: Sequence[str],
    *,
    settings: EvaluationSettings | None = None,
    embedder_options: dict[str, dict[str, Any]] | None = None,
    shard_size: int = 1_000_000,
    chunk_size: int = 20_000,
    device: str = "auto",
    threads: int | None = None,
    executor: Executor | None = None,
    keep_indexes: bool = False,
    progress: Progress = True,
) -> dict[str, Any]:
    """Compare ``embedders`` (specs as for ``build --embedder``) on the atlas store ``atlas`` by holding groups out
    (module docstring); write the JSON, page and chart into the directory ``out``; return the JSON payload.

    ``embedder_options``: per embedder spec, its options (as ``build --embedder-option``). ``shard_size``,
    ``chunk_size``, ``device``, ``threads``, ``executor``: as for :func:`index.build_index` (the builds' shard tasks
    run on ``executor``).
    """
    from scatlas.atlas.embed import make_embedder
    from scatlas.atlas.store import AtlasStore

    s = settings or EvaluationSettings()
    specs = list(dict.fromkeys(e.strip() for e in embedders if e.strip()))
    if not specs:
        raise InputError("give at least one embedder to evaluate (e.g. --embedders pca)")
    options = {spec: dict((embedder_options or {}).get(spec, {})) for spec in specs}
    unknown = sorted(set(embedder_options or {}) - set(specs))
    if unknown:
        raise InputError(f"embedder options given for {', '.join(unknown)}, which is not among the embedders "
                         f"evaluated ({', '.join(specs)})")
    for spec in specs:  # unknown names, bad options, missing weights: refused before any work
        make_embedder(spec, **options[spec])
    out = Path(out)
    for name, kind in ((EVALUATION_FILE, "json"), (FIGURE_FILE, "png"), (PAGE_FILE, None)):
        check_output_file(out / name, inputs=(atlas,), file_kind=kind)
    store = AtlasStore.open(atlas)
    try:
        cells = _read_cells(store, s)
        groups, eligible = _choose_groups(cells, s)
        claim_output_dir(out, EVALUATION, inputs=(atlas,))
        work = out / WORK_DIR
        results: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}
        steps = [(spec, g) for spec in specs for g in groups]
        with progress_bar(progress, total=len(steps), desc="evaluate", unit="holdout") as bar:
            for spec, group in steps:
                logger.info("evaluate %s: holding out %s = %r", spec, s.holdout_key, group)
                index_dir = work / f"{specs.index(spec):02d}-{_safe(spec)}-{groups.index(group):02d}"
                config = BuildConfig(shard_size=shard_size, chunk_size=chunk_size, device=device, threads=threads,
                                     seed=s.seed)
                try:
                    results[spec].append(_holdout(store, cells, spec, options[spec], group, index_dir, config, s,
                                                  executor))
                finally:
                    if not keep_indexes:
                        shutil.rmtree(index_dir, ignore_errors=True)
                bar.update(1)
        if not keep_indexes:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        store.close()
    payload = {
        "embedders": [_summary(spec, options[spec], results[spec]) for spec in specs],
        "settings": {**asdict(s), "atlas": str(atlas), "n_cells": int(len(cells.ids)), "holdouts": groups,
                     "eligible_groups": eligible, "embedder_options": options, "shard_size": shard_size,
                     "label_classes": "values merged by Cell Ontology term (as build)" if s.heads
                                      else "raw values (no heads, so no stored label classes)",
                     "design": "per embedder and held-out group: embedder fitted, index built and label head trained "
                               "on the other cells only"},
    }
    _write(out, payload)
    return payload


def _safe(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in spec)[:40]


def _read_cells(store: Any, s: EvaluationSettings) -> _Cells:
    with store.connect() as con:
        columns = [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
        for what, col in (("label", s.label_key), ("holdout", s.holdout_key)):
            if col not in columns:
                raise InputError(f"the {what} column {col!r} is not a column of the atlas' cells; available: "
                                 f"{', '.join(columns)}")
        ranges = pd.DataFrame([(a, b) for _ds, a, b in store.cell_ranges()], columns=["start", "stop"])
        con.register("_committed", ranges)
        frame = con.execute(
            f"SELECT c.soma_joinid AS id, CAST(c.{quote_ident(s.holdout_key)} AS VARCHAR) AS grp, "
            f"CAST(c.{quote_ident(s.label_key)} AS VARCHAR) AS label FROM cells c JOIN _committed r "
            "ON c.soma_joinid >= r.start AND c.soma_joinid < r.stop ORDER BY c.soma_joinid"
        ).df()

    def clean(values: pd.Series) -> np.ndarray:
        return values.astype(object).where(values.notna() & (values.astype(str) != ""), None).to_numpy(dtype=object)

    return _Cells(frame["id"].to_numpy(dtype=np.int64), clean(frame["grp"]), clean(frame["label"]))


def _choose_groups(cells: _Cells, s: EvaluationSettings) -> tuple[list[str], dict[str, int]]:
    labelled = np.array([v is not None for v in cells.label], dtype=bool)
    counts = pd.Series(cells.group[labelled & np.array([g is not None for g in cells.group])]).value_counts()
    eligible = {str(g): int(n) for g, n in counts.items() if n >= s.min_group_cells}
    if not eligible:
        raise TooFewCellsError(
            f"no {s.holdout_key} group has {s.min_group_cells} or more cells labelled in {s.label_key}: nothing to "
            "hold out"
        )
    n_labelled = int(labelled.sum())
    order = sorted(eligible, key=lambda g: (-eligible[g], g))
    groups = [g for g in order if n_labelled - eligible[g] >= s.min_group_cells][: s.max_holdouts]
    if not groups:
        raise TooFewCellsError(
            f"every labelled cell is in one {s.holdout_key} group ({order[0]!r}): holding it out leaves no labelled "
            f"atlas to transfer {s.label_key} from; evaluate needs labels in two groups or more"
        )
    return groups, eligible


def _holdout(store: Any, cells: _Cells, spec: str, options: dict[str, Any], group: str, index_dir: Path,
             config: BuildConfig, s: EvaluationSettings, executor: Executor | None) -> dict[str, Any]:
    from scatlas.atlas.embed import make_embedder

    timer = _Timer()
    held = cells.group == group
    rest_ids, held_ids = cells.ids[~held], cells.ids[held]
    # 1. the embedder, fitted on the rest only
    t0 = time.perf_counter()
    embedder = make_embedder(spec, **options)
    if embedder.requires_fit:
        fit_ids = sample_sorted(rest_ids, s.fit_sample, s.seed).astype(np.int64)
        fit_reads = cell_reads(embedder, "atlas")
        # a zero-argument callable: fitting may take several passes over the sample (PCA takes two)
        embedder.fit(lambda: read_chunks(store, fit_ids, 10_000, fit_reads))  # type: ignore[arg-type]
    timer.add("fit", t0)
    # 2. the index of the rest (shard tasks on the executor), its metadata only the rest's rows
    t0 = time.perf_counter()
    source = RestSource(store, embedder, rest_ids)
    with store.connect() as con:
        con.register("_rest", pd.DataFrame({"soma_joinid": rest_ids}))
        rest_rows = con.execute("SELECT c.* FROM cells c JOIN _rest USING (soma_joinid) ORDER BY soma_joinid").df()
    build_from_source(source, index_dir, config, cells=rest_rows, embedder=embedder, snapshot=store.snapshot(),
                      gene_vocabulary_hash=store.genes.fingerprint(), overwrite=True, executor=executor,
                      extra_identity={"evaluate_holdout": {s.holdout_key: group}})
    timer.add("build", t0)
    if s.heads:
        t0 = time.perf_counter()
        train_label_heads(store, index_dir, [s.label_key], seed=s.seed, progress=False)
        timer.add("heads", t0)
    labelled_held = held_ids[np.array([v is not None for v in cells.label[held]], dtype=bool)]
    query_ids = sample_sorted(labelled_held, s.max_query_cells, s.seed + 1).astype(np.int64)
    with AtlasIndex.open(index_dir) as idx:
        adata, vectors = _held_out_cells(store, idx, query_ids, timer)
        figures: dict[str, Any] = {
            "group": group, "n_atlas_cells": int(len(rest_ids)), "n_heldout_cells": int(len(held_ids)),
            "n_evaluated": int(len(query_ids)), "embedder_fingerprint": idx.embedder_fingerprint,
            "dim": int(idx.dim),
        }
        figures.update(_transfer(adata, idx, s))
        figures["batch_mixing"] = batch_mixing(vectors, idx, rest_ids, s.k, s.mixing_cells, s.seed)
        figures["label_conservation"] = _label_conservation(idx, cells, rest_ids, s)
        figures.update(_hunt(idx, cells, rest_ids, query_ids, vectors, s))
    sec = timer.seconds
    figures.update({
        "fit_seconds": round(sec.get("fit", 0.0), 3), "build_seconds": round(sec.get("build", 0.0), 3),
        "heads_seconds": round(sec["heads"], 3) if "heads" in sec else None,
        "fit_seconds_per_1k": _per_1k(sec.get("fit", 0.0), len(rest_ids)),
        "build_seconds_per_1k": _per_1k(sec.get("fit", 0.0) + sec.get("build", 0.0), len(rest_ids)),
        "embed_seconds_per_1k": _per_1k(sec.get("embed", 0.0), len(query_ids)),
    })
    return figures


def _per_1k(seconds: float, n: int) -> float | None:
    return round(1000.0 * seconds / n, 4) if n else None


def _held_out_cells(store: Any, idx: AtlasIndex, ids: np.ndarray, timer: _Timer) -> tuple[Any, np.ndarray]:
    """The held-out cells as an AnnData (X in the store's gene space, log-normalised where datasets differ in what
    their X holds; obs = the cell table's rows; obsm as the embedder reads) and their L2-normalised vectors."""
    import anndata

    from scatlas.atlas.normalize import to_lognorm

    reads = cell_reads(idx.embedder, "query")  # held-out cells are queries (scVI with atlas_obsm: from counts)
    with_x, obsm_keys = reads.x, reads.obsm
    chunks = list(read_chunks(store, ids, 10_000, reads))
    parts, t0 = [], time.perf_counter()
    for chunk in chunks:
        parts.append(idx.embed(chunk))
    timer.add("embed", t0)
    vectors = np.concatenate(parts) if parts else np.zeros((0, idx.dim), dtype=np.float32)
    genes = store.genes
    kinds = {c.x_kind for c in chunks}
    X: sp.csr_matrix | None = None
    if with_x:
        mats = [sp.csr_matrix(c.X) if len(kinds) == 1 else to_lognorm(sp.csr_matrix(c.X), c.x_kind) for c in chunks]
        X = sp.vstack(mats, format="csr").astype(np.float32) if mats else sp.csr_matrix((0, len(genes)))
    else:
        X = sp.csr_matrix((len(ids), len(genes)), dtype=np.float32)
    obs = store.obs(ids)
    obs.index = pd.Index([f"cell{int(i)}" for i in ids])
    var = pd.DataFrame({"feature_id": np.asarray(genes.feature_id, dtype=str),
                        "feature_name": np.asarray(genes.feature_name, dtype=str)},
                       index=pd.Index(np.asarray(genes.keys, dtype=str)))
    adata = anndata.AnnData(X=X, obs=obs, var=var)
    for key in obsm_keys:
        adata.obsm[key] = np.concatenate([np.asarray(c.obsm[key]) for c in chunks])
    return adata, vectors


def _transfer(adata: Any, idx: AtlasIndex, s: EvaluationSettings) -> dict[str, Any]:
    """Label transfer to the held-out cells: the vote (with and without the MNN shift) and the head."""
    from scatlas.query.annotate import annotate

    out: dict[str, Any] = {}
    runs = [("knn", "knn", "mnn"), ("knn_unaligned", "knn", "none")] + ([("heads", "heads", "mnn")] if s.heads else [])
    for name, predictor, align in runs:
        result = annotate(adata, idx, label_keys=[s.label_key], k=s.k, min_confidence=0.0, predictor=predictor,  # type: ignore[arg-type]
                          align=align, truth_key=s.label_key, check_mapping=False, keep_neighbors=False,  # type: ignore[arg-type]
                          progress=False)
        ev = result.report["evaluation"][s.label_key]
        out[f"{name}_macro_f1"] = ev.get("macro_f1")
        out[f"{name}_accuracy"] = ev.get("accuracy")
        if name == "knn":
            out["labels_absent_from_atlas"] = ev.get("truth_labels_absent_from_atlas", {})
    if not s.heads:
        out["heads_macro_f1"] = out["heads_accuracy"] = None
    return out


def batch_mixing(held: np.ndarray, idx: AtlasIndex, atlas_ids: np.ndarray, k: int, max_cells: int,
                 seed: int) -> float | None:
    """The iLISI-like mixing of held-out vectors ``held`` (L2-normalised) with the atlas (module docstring)."""
    m = int(min(len(held), len(atlas_ids), max_cells))
    if m < 2:
        return None
    rng = np.random.default_rng(seed + 7)
    a = l2_normalize(idx.vectors(sample_sorted(atlas_ids, m, rng)))
    h = held[np.sort(rng.choice(len(held), size=m, replace=False))]
    pooled = np.concatenate([h, a]).astype(np.float32)
    side = np.repeat([0, 1], m)
    kk = int(min(k, 2 * m - 1))
    sims = pooled @ pooled.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    other = (side[nearest] != side[:, None]).mean(axis=1)
    expected = m / (2 * m - 1)
    return round(float(min(1.0, other.mean() / expected)), 4)


def _label_conservation(idx: AtlasIndex, cells: _Cells, rest_ids: np.ndarray, s: EvaluationSettings) -> float | None:
    labels = cells.label_of(rest_ids)
    labelled = rest_ids[np.array([v is not None for v in labels], dtype=bool)]
    ids = sample_sorted(labelled, s.conservation_cells, s.seed + 3).astype(np.int64)
    if len(ids) < 2:
        return None
    found = idx.search(idx.vectors(ids), k=min(s.k + 1, idx.n_cells))
    own = cells.label_of(ids)
    shares = []
    for row, cell, label in zip(found.ids, ids, own, strict=True):
        nb = row[(row >= 0) & (row != cell)][: s.k]
        nb_labels = cells.label_of(nb)
        known = np.array([v is not None for v in nb_labels], dtype=bool)
        shares.append(float(np.mean(nb_labels[known] == label)) if known.any() else np.nan)
    per_label = pd.Series(shares).groupby(pd.Series(own, dtype=object)).mean().dropna()
    return round(float(per_label.mean()), 4) if len(per_label) else None


def _hunt(idx: AtlasIndex, cells: _Cells, rest_ids: np.ndarray, query_ids: np.ndarray, vectors: np.ndarray,
          s: EvaluationSettings) -> dict[str, Any]:
    none: dict[str, Any] = {"hunt_recall": None, "hunt_precision": None, "hunt_types": []}
    if not s.hunt:
        return {**none, "hunt_note": "not run (hunt=False)"}
    rest_labels = pd.Series(cells.label_of(rest_ids)).dropna()
    held_labels = cells.label_of(query_ids)
    counts = rest_labels.value_counts()
    rare = [str(lbl) for lbl, n in counts.sort_values(kind="stable").items()
            if n / len(rest_labels) < s.rare_fraction and n >= s.min_rare_train
            and int(np.sum(held_labels == lbl)) >= s.min_rare_heldout][: s.max_rare_types]
    if not rare:
        return {**none, "hunt_note": f"no {s.label_key} label under {100 * s.rare_fraction:g}% of the atlas with "
                                     f"{s.min_rare_train}+ atlas and {s.min_rare_heldout}+ held-out cells"}
    from scatlas.query.hunt import train

    types: list[dict[str, Any]] = []
    for label in rare:
        clf = train(idx, positive_sql=f"{quote_ident(s.label_key)} = {quote_literal(label)}",
                    background=min(s.hunt_background, max(idx.n_cells - 1, 1)), device="cpu", seed=s.seed,
                    progress=False)
        called = clf.decision_function(vectors) >= clf.threshold
        truth = held_labels == label
        types.append({
            "label": label, "atlas_fraction": round(float(counts[label] / len(rest_labels)), 5),
            "atlas_cells": int(counts[label]), "heldout_cells": int(truth.sum()), "called": int(called.sum()),
            "recall": round(float(called[truth].mean()), 4),
            "precision": round(float(truth[called].mean()), 4) if called.any() else None,
        })
    precisions = [float(t["precision"]) for t in types if t["precision"] is not None]
    recalls = [float(t["recall"]) for t in types]
    return {"hunt_recall": round(float(np.mean(recalls)), 4),
            "hunt_precision": round(float(np.mean(precisions)), 4) if precisions else None, "hunt_types": types}


# -- the summary and the outputs ------------------------------------------------------------------------------------


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
    return round(float(np.mean(vals)), 4) if vals else None


def _summary(spec: str, options: dict[str, Any], holdouts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "embedder": spec, "options": options, "embedder_saw_holdout": False, "n_holdouts": len(holdouts),
        **{name: _mean([h.get(name) for h in holdouts]) for name in _AVERAGED},
        "holdouts": holdouts,
    }


def _write(out: Path, payload: dict[str, Any]) -> None:
    with writing(out / EVALUATION_FILE):
        write_json_atomic(out / EVALUATION_FILE, payload)
    with writing(out / FIGURE_FILE):
        _chart(out / FIGURE_FILE, payload)
    with writing(out / PAGE_FILE):
        tmp = out / f".{PAGE_FILE}.tmp"
        tmp.write_text(_page(payload), encoding="utf-8")
        tmp.replace(out / PAGE_FILE)


def _chart(path: Path, payload: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["embedders"]
    names = [r["embedder"] for r in rows]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title) in zip(axes.ravel(), FIGURES, strict=True):
        values = [r.get(key) for r in rows]
        ax.bar(range(len(names)), [v if v is not None else 0.0 for v in values], color="#4c72b0")
        for i, r in enumerate(rows):  # each held-out group as a dot
            pts = [h.get(key) for h in r["holdouts"] if h.get(key) is not None]
            ax.plot([i] * len(pts), pts, "o", color="black", markersize=3)
            if values[i] is None:
                ax.text(i, 0.02, "n/a", ha="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if "seconds" not in key:
            ax.set_ylim(0, 1.05)
    s = payload["settings"]
    fig.suptitle(f"embedders on held-out {s['holdout_key']} groups ({', '.join(map(str, s['holdouts']))}); "
                 f"label {s['label_key']}, k={s['k']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _page(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in FIGURES)
    body = "".join(
        f"<tr><td>{html.escape(r['embedder'])}</td>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k, _ in FIGURES)
        + "</tr>" for r in payload["embedders"])
    per = "".join(
        f"<tr><td>{html.escape(r['embedder'])}</td><td>{html.escape(str(h['group']))}</td>"
        f"<td>{h['n_atlas_cells']:,}</td><td>{h['n_evaluated']:,}</td>"
        + "".join(f"<td>{_fmt(h.get(k))}</td>" for k, _ in FIGURES) + "</tr>"
        for r in payload["embedders"] for h in r["holdouts"])
    doc = html.escape(__doc__ or "").split("Figures (per group")[1].split("Writes ``OUT")[0]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>scatlas evaluate</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}</style></head>
<body><h1>Which embedder works best on this atlas?</h1>
<p>Atlas {html.escape(str(s['atlas']))} ({s['n_cells']:,} cells); label <code>{html.escape(s['label_key'])}</code>;
held out in turn: <code>{html.escape(s['holdout_key'])}</code> = {html.escape(', '.join(map(str, s['holdouts'])))}.
For each embedder and group, the embedder was fitted, the index built and the label head trained on the other cells
only (the held-out cells were never seen). Averages over the groups:</p>
<table><tr><th>embedder</th>{head}</tr>{body}</table>
<p><img src="{FIGURE_FILE}" alt="bar charts of the figures" style="max-width:100%"></p>
<h2>Per held-out group</h2>
<table><tr><th>embedder</th><th>group</th><th>atlas cells</th><th>evaluated</th>{head}</tr>{per}</table>
<h2>What the figures mean</h2><pre style="white-space:pre-wrap">Figures (per group{doc}</pre>
<h2>Settings</h2><pre>{html.escape(_settings_text(s))}</pre></body></html>
"""


def _settings_text(s: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in s.items() if k != "eligible_groups") + (
        f"\neligible groups (labelled cells): {s.get('eligible_groups')}")

