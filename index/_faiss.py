"""FAISS, imported on first use (it is heavy, and its type stubs disagree with its Python wrappers)."""

from __future__ import annotations

from typing import Any


def faiss_module() -> Any:
    import faiss

    return faiss
