"""Which implementation of an op runs: the backend registry.

Backends: ``reference`` (eager PyTorch), ``cpu`` (C++), ``triton``, ``cuda`` (hand-written CUDA).
On CPU tensors the default is the C++ kernel. On CUDA tensors it is the fastest backend that has
been validated on a GPU for that op (recorded below with the registration), else the reference.
Override with ``VIDSTREAM_BACKEND=<name>`` or ``with vidstream.use_backend("<name>"):``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension

NAMES = ("reference", "cpu", "triton", "cuda")
# Order in which validated GPU backends are preferred for CUDA tensors.
_GPU_PREFERENCE = ("cuda", "triton")


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    gpu_validated: bool  # has passed the test suite on a real GPU


_registry: dict[str, dict[str, _Impl]] = {}
_forced: list[str] = []


def _check_name(name: str, where: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{where}: unknown backend {name!r}; known backends: {', '.join(NAMES)}")
    return name


_env_backend = os.environ.get("VIDSTREAM_BACKEND") or None
if _env_backend is not None:
    _check_name(_env_backend, "VIDSTREAM_BACKEND")


def register(op: str, backend: str, fn: Callable, *, gpu_validated: bool = False):
    _registry.setdefault(op, {})[_check_name(backend, "register")] = _Impl(fn, gpu_validated)


def _triton_mode() -> str | None:
    """'gpu', 'interpret' or None (triton missing)."""
    from . import triton_kernels

    return triton_kernels.mode()


def _usable(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``backend`` can run ``op`` on tensors of this device and dtype here, else why not."""
    if backend == "reference":
        return None
    if dtype == torch.float64:
        return "kernels take float32, float16 and bfloat16 (float64 runs on the reference backend)"
    if backend == "cpu":
        if device.type != "cpu":
            return "the cpu backend takes CPU tensors"
        return None if _extension.load() else "vidstream._C is not built or failed to load"
    if backend == "cuda":
        if device.type != "cuda":
            return "the cuda backend takes CUDA tensors"
        return None if _extension.built_with_cuda() else (
            "vidstream._C was built without CUDA kernels (VIDSTREAM_BUILD_CUDA)")
    mode = _triton_mode()  # triton
    if mode is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None if mode == "gpu" else "TRITON_INTERPRET=1 runs triton on CPU tensors only"
    if device.type == "cpu" and mode == "interpret":
        if dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16"
        return None
    return "triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"


def _available(op: str, device, dtype) -> list[str]:
    return [b for b in _registry.get(op, {}) if _usable(b, op, device, dtype) is None]


def resolve(op: str, x: torch.Tensor) -> Callable:
    """The implementation of ``op`` for inputs like ``x``."""
    impls = _registry[op]
    chosen = _forced[-1] if _forced else _env_backend
    if chosen is not None:
        why = "it has no kernel for this op" if chosen not in impls else _usable(
            chosen, op, x.device, x.dtype)
        if why is not None:
            avail = ", ".join(_available(op, x.device, x.dtype))
            raise ValueError(
                f"backend {chosen!r} cannot run vidstream.{op} on {x.dtype} {x.device.type} tensors: "
                f"{why}. Available for these inputs: {avail}")
        return impls[chosen].fn
    return resolve_default(op, x)


def resolve_default(op: str, x: torch.Tensor) -> Callable:
    """The implementation the defaults pick for ``op`` on inputs like ``x``, whatever backend is
    in force: for an op that composes another one the backend in force may not have."""
    impls = _registry[op]
    if x.device.type == "cuda":
        for name in _GPU_PREFERENCE:
            impl = impls.get(name)
            if impl is not None and impl.gpu_validated and _usable(name, op, x.device, x.dtype) is None:
                return impl.fn
        return impls["reference"].fn
    if "cpu" in impls and _usable("cpu", op, x.device, x.dtype) is None:
        return impls["cpu"].fn
    return impls["reference"].fn


def backend_for(op: str, x: torch.Tensor) -> str:
    """The name of the backend ``resolve`` picks (for reports and tests)."""
    fn = resolve(op, x)
    return next(name for name, impl in _registry[op].items() if impl.fn is fn)


@contextlib.contextmanager
def use_backend(name: str):
    """Run every vidstream op inside the block on backend ``name`` (an error where it can't)."""
    _forced.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.pop()


def backends(device: str | torch.device | None = None) -> list[str]:
    """The backends usable here: for ``device`` if given, else for CPU and (if present) CUDA."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    return [name for name in NAMES if any(
        _usable(name, op, d, torch.float32) is None for d in devices for op in _registry
        if name in _registry[op])]
