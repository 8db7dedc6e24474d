"""Scoring blocks of stored float16 vectors against a linear classifier, fast and exactly.

The fast pass reads the stored block as it is, with no float32 copy of the data, which is what lets the sweep run
near memory bandwidth (see ``docs/benchmarks.md``). On the CPU it is the compiled kernel of
:mod:`query.hunt.fp16dot` (kernel ``"c16"``: float16 rows converted in registers, float32 accumulation), or, where
that extension was not built, a torch float16 matrix-vector product (``"fp16"``: ``torch.mv`` over
``torch.from_numpy(block)``; also the GPU kernel). Its result has at worst float16 precision, so every row whose
fast score lies within ``margin`` of the cut is re-scored exactly (float64 on the stored values, :func:`exact_scores`); rows below the
cut minus the margin cannot be hits. The hits and their scores are therefore exactly those of the float64 score of
the stored vectors, whatever the kernel, block size or device.

The margin bounds the float16 error: weights rounded to float16 (``<= 2^-11 ||w||`` for unit vectors), the
float16 result (``<= 2^-11 |s|``), accumulation; ``margin = 2^-7 ||w|| + 1e-6`` leaves a factor of >= 4 over the
float32-accumulation bound, and :meth:`BlockScorer.check` measures the actual error on the first block and falls
back to a float32 kernel (logged) when it comes near the margin.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from scatlas.index import sample_sorted
from scatlas.query.hunt.classifier import exact_scores

logger = logging.getLogger(__name__)

MARGIN_FACTOR = 2.0**-7
CHECK_ROWS = 2048
RETUNE_BYTES = 8 << 30
"""The thread count is re-chosen after every 8 GiB of vectors scored."""
TUNE_BYTES = 32 << 20
"""While thread counts are being timed, blocks are cut to slices of this size (:meth:`ThreadTuner.rows`): the
comparison then scores a few slices at the slower count instead of whole blocks, which in a one-shot sweep of a
few GB cost ~10% of its rate (see docs/benchmarks.md#sweep-one-shot)."""


@dataclass
class BlockHits:
    rows: np.ndarray  # int64 positions within the block
    scores: np.ndarray  # float32 exact scores
    n_candidates: int  # rows re-scored exactly


class BlockScorer:
    """Finds the rows of float16 blocks with ``w . x + b >= cutoff``, with exact scores.

    ``kernel``: ``"auto"`` (default: ``"c16"`` on the CPU when the compiled kernel is built, else ``"fp16"``),
    ``"c16"`` (compiled float16 kernel, CPU), ``"fp16"`` (torch float16 matvec, on ``device``) or ``"fp32"`` (the
    block converted into a reused float32 buffer first: slower, for checking and as a fallback).
    """

    def __init__(self, weights: np.ndarray, bias: float, cutoff: float, *, device: str = "cpu", kernel: str = "auto"):
        import torch

        from scatlas.query.hunt import fp16dot

        if kernel == "auto":
            kernel = "c16" if device == "cpu" and fp16dot.available() else "fp16"
        if kernel not in ("c16", "fp16", "fp32"):
            raise ValueError(f"unknown kernel {kernel!r}")
        if kernel == "c16" and (device != "cpu" or not fp16dot.available()):
            raise ValueError("the c16 kernel runs on the CPU and needs the compiled extension (query.hunt._fp16dot)")
        self.w = np.ascontiguousarray(weights, dtype=np.float32)
        self.bias = float(bias)
        self.cutoff = float(cutoff)
        self.device = device
        self.kernel = kernel
        self.margin = MARGIN_FACTOR * float(np.linalg.norm(self.w.astype(np.float64))) + 1e-6
        self._w16 = torch.from_numpy(self.w.astype(np.float16)).to(device)
        self._w32 = torch.from_numpy(self.w.copy()).to(device)
        self._buf: Any = None
        self._out: np.ndarray | None = None
        self.tuner: ThreadTuner | None = None
        self.checked = False
        self.max_error = 0.0

    @property
    def lower(self) -> float:
        """Rows whose fast score (without the bias) is below this cannot be hits."""
        return self.cutoff - self.bias - self.margin

    def fast_scores(self, block: np.ndarray) -> Any:
        """Approximate ``block @ w`` (no bias) as a float32 torch tensor on the CPU."""
        import torch

        s, _ = self._native_scores(block)
        return torch.from_numpy(s.copy()) if isinstance(s, np.ndarray) else s.float().cpu()

    def _native_scores(self, block: np.ndarray) -> tuple[Any, np.dtype[Any]]:
        """The kernel's own output (a float32 array for c16; a torch tensor on the kernel's device, float16 for
        fp16, float32 for fp32) and the dtype whose precision it has."""
        import torch

        if self.kernel == "c16":
            return self._c16(block), np.dtype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmaps: torch only reads them
            t = torch.from_numpy(block)
        if self.kernel == "fp16":
            if self.device != "cpu":
                t = t.to(self.device, non_blocking=False)
            return torch.mv(t, self._w16), np.dtype(np.float16)
        if self._buf is None or self._buf.shape[0] < len(block) or self._buf.shape[1] != block.shape[1]:
            self._buf = torch.empty(block.shape, dtype=torch.float32, device=self.device)
        buf = self._buf[: len(block)]
        buf.copy_(t)
        return torch.mv(buf, self._w32), np.dtype(np.float32)

    def check(self, block: np.ndarray, seed: int = 0) -> float:
        """Measure the fast kernel's largest error on up to ``CHECK_ROWS`` rows; fall back to fp32 if too large."""
        rows = sample_sorted(len(block), CHECK_ROWS, seed)
        sub = np.ascontiguousarray(block[rows])
        fast = self.fast_scores(sub).numpy().astype(np.float64)
        exact = exact_scores(sub, self.w, 0.0).astype(np.float64)
        err = float(np.max(np.abs(fast - exact))) if len(rows) else 0.0
        self.max_error = max(self.max_error, err)
        self.checked = True
        if self.kernel in ("fp16", "c16") and (not math.isfinite(err) or err > 0.25 * self.margin):
            logger.warning(
                "%s kernel error %.3g exceeds a quarter of the safety margin %.3g: using the float32 kernel",
                self.kernel, err, self.margin,
            )
            self.kernel = "fp32"
        return err

    def _lower_as(self, dtype: np.dtype[Any]) -> float:
        """:attr:`lower` rounded down to ``dtype`` (float16 or float32): ``s >= result`` for every value ``s`` of
        that dtype with ``s >= lower``, so comparing the kernel's own output with it loses no candidate."""
        with np.errstate(over="ignore"):  # beyond the dtype's range: +-inf, then the largest finite value below
            low = dtype.type(self.lower)
            if float(low) > self.lower:
                low = np.nextafter(low, dtype.type(-np.inf))
        return float(low)

    def _c16(self, block: np.ndarray) -> np.ndarray:
        """The compiled kernel's scores (a view of a reused buffer), with torch's current CPU thread count."""
        import torch

        from scatlas.query.hunt import fp16dot

        n = len(block)
        if self._out is None or len(self._out) < n:
            self._out = np.empty(n, dtype=np.float32)
        block = block if block.flags.c_contiguous else np.ascontiguousarray(block)
        return fp16dot.matvec(block, self.w, self._out[:n], threads=torch.get_num_threads())

    def candidates(self, block: np.ndarray) -> np.ndarray:
        """Positions (int64) of the rows whose fast score may reach the cut (a superset of the hits).

        The comparison is made on the kernel's own output (float16 for the fp16 kernel), against :attr:`lower`
        rounded down to that dtype, on the kernel's device: no float32 copy of the scores, and on a GPU only the
        candidate positions come back to the host."""
        s, dtype = self._native_scores(block)
        low = self._lower_as(dtype)
        if isinstance(s, np.ndarray):
            return np.flatnonzero(s >= low).astype(np.int64)
        cand: np.ndarray = (s >= low).nonzero().flatten().cpu().numpy().astype(np.int64)
        return cand

    def hits(self, block: np.ndarray) -> BlockHits:
        if not self.checked and len(block):
            self.check(block)
        cand = self.candidates(block)
        if len(cand) == 0:
            return BlockHits(cand, np.zeros(0, dtype=np.float32), 0)
        exact = exact_scores(block[cand], self.w, self.bias)
        keep = exact >= np.float32(self.cutoff)
        return BlockHits(cand[keep], exact[keep], len(cand))


class ThreadTuner:
    """Chooses the torch CPU thread count from timed blocks, and re-checks it as the sweep goes.

    On a machine shared with other work, several torch threads can be much slower than one (a thread waiting for
    a descheduled sibling at every synchronisation; see docs/benchmarks.md#sweep-threads), while on an idle
    machine they are faster. So one block is scored with each candidate count
    (real work, not extra passes), the fastest count is used, and the comparison is repeated after every
    ``retune_bytes`` of vectors. Each candidate is timed on ``rounds`` blocks, interleaved; callers cut blocks to
    ``tune_bytes`` slices while the tuner is :attr:`tuning` (:meth:`rows`).
    """

    def __init__(
        self, candidates: list[int], retune_bytes: int = RETUNE_BYTES, rounds: int = 2, tune_bytes: int = TUNE_BYTES
    ) -> None:
        self.candidates = sorted(set(candidates))
        self.best = self.candidates[-1]
        self.retune_bytes = int(retune_bytes)
        self.rounds = int(rounds)
        self.tune_bytes = int(tune_bytes)
        self._pending: list[int] = self._schedule()
        self._bytes: dict[int, float] = {}
        self._secs: dict[int, float] = {}
        self._rates: dict[int, float] = {}
        self._since = 0
        self._warm = True  # the very first block (imports, kernel check) is not timed
        self.history: list[int] = []

    def _schedule(self) -> list[int]:
        """Candidates interleaved ``rounds`` times (1, n, 1, n): a burst of load hits both alike."""
        return self.candidates * self.rounds if len(self.candidates) > 1 else []

    @property
    def tuning(self) -> bool:
        """Whether the next blocks are timed (the untimed first block, a comparison under way or due)."""
        due = len(self.candidates) > 1 and self._since >= self.retune_bytes
        return self._warm or bool(self._pending) or due

    def rows(self, block_rows: int, row_bytes: int) -> int:
        """How many rows to score next: ``block_rows``, or a ``tune_bytes`` slice of them while :attr:`tuning`."""
        if not self.tuning:
            return block_rows
        return max(1, min(block_rows, self.tune_bytes // max(1, row_bytes)))

    def before_block(self) -> int:
        import torch

        if not self._pending and len(self.candidates) > 1 and self._since >= self.retune_bytes:
            self._pending, self._bytes, self._secs, self._since = self._schedule(), {}, {}, 0
        threads = self._pending[0] if self._pending and not self._warm else self.best
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    def after_block(self, threads: int, nbytes: int, seconds: float) -> None:
        self._since += nbytes
        if self._warm:
            self._warm = False
            return
        if not self._pending or threads != self._pending[0]:
            return
        self._bytes[threads] = self._bytes.get(threads, 0.0) + nbytes
        self._secs[threads] = self._secs.get(threads, 0.0) + max(seconds, 1e-9)
        self._pending.pop(0)
        if not self._pending:
            self._rates = {t: self._bytes[t] / self._secs[t] for t in self._bytes}
            self.best = max(self._rates, key=lambda t: self._rates[t])
            self.history.append(self.best)
            logger.debug("thread tuning: %s bytes/s -> %d threads",
                         {t: f"{r:.3g}" for t, r in self._rates.items()}, self.best)
