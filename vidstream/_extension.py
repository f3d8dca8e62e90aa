"""Loads the compiled extension ``vidstream._C`` once. Without it vidstream still imports and
runs on its other backends, after one warning."""

from __future__ import annotations

import warnings

import torch

_loaded = None
_error = None


def load() -> bool:
    """True when ``vidstream._C`` (and so ``torch.ops.vidstream``) is available."""
    global _loaded, _error
    if _loaded is None:
        try:
            from . import _C  # noqa: F401

            _loaded = True
        except (ImportError, OSError) as e:
            _loaded, _error = False, e
            warnings.warn(
                f"vidstream: the compiled extension vidstream._C could not be loaded ({e}); the cpu "
                "and cuda backends are unavailable, the reference and triton backends still work. "
                "Rebuild with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``vidstream::op`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key(f"vidstream::{op}", dispatch_key)


def register_fake(op: str):
    """``torch.library.register_fake`` for the C++ op ``vidstream::op``, skipped (with the op)
    when the extension did not load."""

    def wrap(fn):
        if load():
            torch.library.register_fake(f"vidstream::{op}")(fn)
        return fn

    return wrap
