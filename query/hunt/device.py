"""Torch device choice for training and sweeping: ``auto`` uses CUDA when torch sees it, ``cuda`` requires it."""

from __future__ import annotations

import logging
from typing import Literal

from scatlas.atlas.errors import DependencyError, InputError

logger = logging.getLogger(__name__)

TorchDevice = Literal["cpu", "cuda"]


def resolve_device(device: str | None) -> TorchDevice:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; ``"cuda"`` without one -> DependencyError."""
    import torch

    choice = (device or "auto").lower()
    if choice == "gpu":
        choice = "cuda"
    if choice not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    if choice == "cpu":
        return "cpu"
    has_cuda = bool(torch.cuda.is_available())
    if choice == "cuda":
        if not has_cuda:
            raise DependencyError(
                "device='cuda' was asked for but torch sees no CUDA device (CPU-only torch build, or no GPU visible). "
                "Install a CUDA build of torch on a GPU machine, or use device='cpu' / 'auto'."
            )
        return "cuda"
    resolved: TorchDevice = "cuda" if has_cuda else "cpu"
    logger.info("device auto: using %s", resolved)
    return resolved
