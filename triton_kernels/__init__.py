"""Triton kernels of vidstream, installed as ``vidstream.triton_kernels``.

Kernel modules import triton; this package itself does not, so ``mode()`` can say whether
triton can run here without paying for the import of the kernels."""

from __future__ import annotations

import importlib.util
import os

import torch


def mode() -> str | None:
    """'gpu' (compiled kernels on CUDA tensors), 'interpret' (``TRITON_INTERPRET=1``: CPU
    tensors through the interpreter) or None (triton not installed, or nothing to run on)."""
    if importlib.util.find_spec("triton") is None:
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "interpret"
    return "gpu" if torch.cuda.is_available() else None
