"""Query-to-atlas MNN alignment: :mod:`index.align` (re-exported here for the query modules that import it)."""

from __future__ import annotations

from scatlas.index import ALIGN_SAMPLE as DEFAULT_SAMPLE
from scatlas.index import Alignment, apply_shift, estimate_shift

__all__ = ["DEFAULT_SAMPLE", "Alignment", "apply_shift", "estimate_shift"]
