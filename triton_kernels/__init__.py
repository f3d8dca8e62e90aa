"""Triton kernels of vidstream, installed as ``vidstream.triton_kernels``.

Kernel modules import triton; this package itself does not, so ``mode()`` can say whether
triton can run here without paying for the import of the kernels."""

from __future__ import annotations

import importlib.util
import os

import torch

_mode: list = []


def mode() -> str | None:
    """'gpu' (compiled kernels on CUDA tensors), 'interpret' (``TRITON_INTERPRET=1``: CPU
    tensors through the interpreter) or None (triton not installed, or nothing to run on).
    Decided once: triton reads ``TRITON_INTERPRET`` when its kernels are defined."""
    if not _mode:
        if importlib.util.find_spec("triton") is None:
            _mode.append(None)
        elif os.environ.get("TRITON_INTERPRET", "0") == "1":
            _mode.append("interpret")
        else:
            _mode.append("gpu" if torch.cuda.is_available() else None)
    return _mode[0]
