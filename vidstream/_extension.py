"""Loads the compiled extension ``vidstream._C`` once. Without it vidstream still imports and
runs on its other backends, after one warning."""

from __future__ import annotations

import warnings

import torch

_loaded = None
_error = None
_kernels: dict[str, frozenset] = {}  # dispatch key -> ops with a kernel for it


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
    """Whether ``vidstream::op`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA"). Looked up
    once, so that backend resolution inside torch.compile is plain Python."""
    if not load():
        return False
    if dispatch_key not in _kernels:
        names = torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
        _kernels[dispatch_key] = frozenset(n.split("::", 1)[1].split(".")[0] for n in names
                                           if n.startswith("vidstream::"))
    return op in _kernels[dispatch_key]


def built_with_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels (``VIDSTREAM_BUILD_CUDA``)."""
    return has_kernel("rope3d", "CUDA")


def register_fake(op: str):
    """``torch.library.register_fake`` for the C++ op ``vidstream::op``, skipped (with the op)
    when the extension did not load."""

    def wrap(fn):
        if load():
            torch.library.register_fake(f"vidstream::{op}")(fn)
        return fn

    return wrap
