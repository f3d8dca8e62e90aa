"""Which implementation of an op runs: the kernel registry.

A *backend* is a family of implementations: ``reference`` (eager PyTorch, the oracle), ``cpu``
(C++), ``triton``, ``cuda`` (hand-written CUDA), ``torch`` (composed only of PyTorch's own fused
ops: SDPA, matmuls, index ops; any device, and float64 as well as float32/float16/bfloat16).
torch's dispatcher picks the device kernel of a C++ op; this registry picks among backends. On
CPU tensors the default is the C++ kernel (the reference for float64 or without ``vidstream._C``).
On CUDA tensors it is the first of ``cuda``, ``triton`` validated on a GPU for that op, else
``torch``: the reference (materialised scores and masks) is never a CUDA default.
Override with ``VIDSTREAM_BACKEND=<name>`` or ``with vidstream.use_backend("<name>"):``; the
override is local to the thread / asyncio task (a ``contextvars`` variable), so two generators in
two threads never see each other's choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension

NAMES = ("reference", "cpu", "triton", "cuda", "torch")
# Order in which validated GPU backends are preferred for CUDA tensors.
_GPU_PREFERENCE = ("cuda", "triton")


def _check_name(name: str, where: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{where}: unknown backend {name!r}; known backends: {', '.join(NAMES)}")
    return name


_env_backend = os.environ.get("VIDSTREAM_BACKEND") or None
if _env_backend is not None:
    _check_name(_env_backend, "VIDSTREAM_BACKEND")

# The stack of use_backend blocks of this thread / task (innermost last).
_forced: contextvars.ContextVar[tuple] = contextvars.ContextVar("vidstream_backend", default=())


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    gpu_validated: bool  # has passed the test suite on a real GPU


class Op:
    """One op's implementations, by backend name, and the choice among them."""

    def __init__(self, name: str):
        self.name = name
        self.impls: dict[str, Implementation] = {}

    def register(self, backend: str, fn: Callable, *, gpu_validated: bool = False) -> Callable:
        self.impls[_check_name(backend, "register")] = Implementation(fn, gpu_validated)
        return fn

    def impl(self, backend: str) -> Callable:
        """The implementation of one backend: for an op composed of another on the same backend."""
        return self.impls[backend].fn

    def available(self, device, dtype) -> list[str]:
        return [b for b in self.impls if usable(b, self.name, device, dtype) is None]

    def resolve_name(self, x: torch.Tensor) -> str:
        """The backend that runs this op on inputs like ``x``; a ``ValueError`` naming the
        available ones where the forced backend cannot."""
        chosen = forced()
        if chosen is None:
            return self.default_name(x)
        why = "it has no kernel for this op" if chosen not in self.impls else usable(
            chosen, self.name, x.device, x.dtype)
        if why is not None:
            avail = ", ".join(self.available(x.device, x.dtype))
            raise ValueError(
                f"backend {chosen!r} cannot run vidstream.{self.name} on {x.dtype} {x.device.type} "
                f"tensors: {why}. Available for these inputs: {avail}")
        return chosen

    def resolve(self, x: torch.Tensor) -> Callable:
        return self.impls[self.resolve_name(x)].fn

    def default_name(self, x: torch.Tensor) -> str:
        """The backend the defaults pick for inputs like ``x``, whatever is forced."""
        if x.device.type == "cuda":
            for name in _GPU_PREFERENCE:
                impl = self.impls.get(name)
                if impl is not None and impl.gpu_validated and usable(
                        name, self.name, x.device, x.dtype) is None:
                    return name
            if "torch" in self.impls and usable("torch", self.name, x.device, x.dtype) is None:
                return "torch"
            return "reference"
        if "cpu" in self.impls and usable("cpu", self.name, x.device, x.dtype) is None:
            return "cpu"
        return "reference"


_ops: dict[str, Op] = {}


def op(name: str) -> Op:
    """The registry entry of op ``name`` (created on first use)."""
    return _ops.setdefault(name, Op(name))


def ops() -> dict[str, Op]:
    return dict(_ops)


def forced() -> str | None:
    """The backend forced here (innermost ``use_backend``, else ``VIDSTREAM_BACKEND``), or None."""
    stack = _forced.get()
    return stack[-1] if stack else _env_backend


# torch.compile cannot trace a ContextVar: the choice is read when a graph is traced and kept in
# it (a compiled function runs on the backend in force when it was compiled). This is the mark
# torch.compiler.assume_constant_result sets; calling it would import torch._dynamo (~140 MiB)
# with vidstream. tests/test_registration.py compiles through it fullgraph.
forced._dynamo_marked_constant = True


@contextlib.contextmanager
def use_backend(name: str):
    """Run every vidstream op inside the block on backend ``name`` (an error where it can't).
    Local to the calling thread / task."""
    token = _forced.set(_forced.get() + (_check_name(name, "use_backend"),))
    try:
        yield
    finally:
        _forced.reset(token)


def _triton_mode() -> str | None:
    """'gpu', 'interpret' or None (triton missing)."""
    from . import triton_kernels

    return triton_kernels.mode()


def usable(backend: str, op_name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``backend`` can run ``op_name`` on tensors of this device and dtype here, else why
    not."""
    if backend == "reference":
        return None
    if backend == "torch":
        # PyTorch's own ops run on every device and float dtype (float64 included: SDPA's
        # CPU flash kernel and its math fallback take it).
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


def backend_for(op_name: str, x: torch.Tensor) -> str:
    """The name of the backend that runs ``op_name`` on inputs like ``x`` (for reports and tests)."""
    return _ops[op_name].resolve_name(x)


def backends(device: str | torch.device | None = None) -> list[str]:
    """The backends usable here: for ``device`` if given, else for CPU and (if present) CUDA."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    return [name for name in NAMES if any(
        usable(name, o.name, d, torch.float32) is None for d in devices for o in _ops.values()
        if name in o.impls)]
