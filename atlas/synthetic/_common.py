"""What the counts and embedding generators share: keyed random streams, fixed-size blocks, output folders."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from scatlas.atlas.errors import InputError

T = TypeVar("T")

# Keys of independent random streams (first entry after the seed).
S_GENES, S_PROGRAM, S_LINEAGE, S_DISEASE, S_DATASETS, S_DONORS = 1, 2, 3, 4, 5, 6
S_DS_EFFECT, S_BLOCK, S_RARE, S_MIXTURE, S_EMB_BLOCK, S_QUERY = 7, 8, 9, 10, 11, 12


def stream(seed: int, *keys: int) -> np.random.Generator:
    """The random stream of ``(seed, *keys)``: independent of every other key and of the order of draws."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def name_key(name: str) -> int:
    """A stable non-negative integer for a name (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def cut_blocks(
    start: int, stop: int, size: int, draw: Callable[[int], T], cache: dict[int, T]
) -> Iterator[tuple[T, int, int]]:
    """Rows ``[start, stop)`` (``start < stop``) as pieces ``(block, lo, hi)``: rows ``lo:hi`` of fixed-size blocks.

    Block ``b`` holds rows ``[b * size, (b + 1) * size)`` and is made by ``draw(b)``; ``cache`` keeps the last
    block drawn, so consecutive ranges draw each block once.
    """
    for b in range(start // size, (stop - 1) // size + 1):
        if b not in cache:
            cache.clear()
            cache[b] = draw(b)
        yield cache[b], max(start, b * size) - b * size, min(stop, (b + 1) * size) - b * size


def prepare_out(out_dir: str | os.PathLike[str], names: Sequence[str], overwrite: bool) -> Path:
    """Create ``out_dir`` (a directory) and refuse, unless ``overwrite``, if any of ``names`` is already in it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise InputError(
            f"{len(existing)} output file(s) already exist in {out} (e.g. {existing[0]}); "
            "choose another directory or pass overwrite=True"
        )
    return out
