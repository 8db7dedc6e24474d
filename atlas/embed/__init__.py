"""Pluggable embedders: cells -> float32 vectors."""

from atlas.embed.base import Embedder
from atlas.embed.registry import available_embedders, load_embedder, make_embedder

__all__ = ["Embedder", "available_embedders", "load_embedder", "make_embedder"]
