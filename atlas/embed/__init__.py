"""Pluggable embedders: cells -> float32 vectors."""

from scatlas.atlas.embed.base import Embedder
from scatlas.atlas.embed.registry import available_embedders, load_embedder, make_embedder

__all__ = ["Embedder", "available_embedders", "load_embedder", "make_embedder"]
