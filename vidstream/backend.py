"""Which implementation of an op runs: the kernel registry.

A *backend* is a family of implementations: ``reference`` (eager PyTorch, the oracle), ``cpu``
(C++), ``triton``, ``cuda`` (hand-written CUDA), ``torch`` (composed only of PyTorch's own fused
ops: SDPA, matmuls, index ops; any device, and float64 as well as float32/float16/bfloat16).
torch's dispatcher picks the device kernel of a C++ op; this registry picks among backends. On
CPU tensors the default is the C++ kernel (the reference for float64 or without ``vidstream._C``).
On CUDA tensors it is the first of ``cuda``, ``triton`` that the record ``vidstream/validated.json``
validates for that op, dtype and GPU architecture with the sources running here
(``vidstream.validation``), else ``torch``: the reference (materialised scores and masks) is never
a CUDA default. ``default_backends()`` says which backend each op gets, and why.
Override with ``VIDSTREAM_BACKEND=<name>`` or ``with vidstream.use_backend("<name>"):``; the
override is local to the thread / asyncio task (a ``contextvars`` variable), so two generators in
two threads never see each other's choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from . import _extension

NAMES = ("reference", "cpu", "triton", "cuda", "torch")
# Backends composed of PyTorch's own differentiable ops: autograd gives their gradients for every
# op. A kernel backend gives gradients for an op where its implementation is marked
# differentiable (``Op.mark_differentiable``: a backward registered with torch.library and, where
# it calls a backward kernel, that kernel present here); ``Op.has_backward`` tells.
DIFFERENTIABLE = ("reference", "torch")


# Order in which validated GPU backends are preferred for CUDA tensors.
_GPU_PREFERENCE = ("cuda", "triton")


def needs_grad(*tensors) -> bool:
    """Whether autograd will want a gradient through an op of these inputs."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _check_name(name: str, where: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{where}: unknown backend {name!r}; known backends: {', '.join(NAMES)}")
    return name


_log = logging.getLogger("vidstream")
_logged: set[tuple] = set()  # (op, device type, dtype, backend) already logged


def _logging() -> bool:
    """Whether to log backend choices: at debug level, and not while torch.compile traces (the
    logging module is one it will not trace; the graph keeps the choice made when tracing)."""
    return not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG)


def _log_choice(op_name: str, x: torch.Tensor, backend: str, why: str) -> None:
    """Debug-log the backend ``op_name`` resolved to, once per op, device type, dtype and backend."""
    key = (op_name, x.device.type, x.dtype, backend)
    if key not in _logged:
        _logged.add(key)
        _log.debug("vidstream.%s on %s %s tensors runs on the %s backend (%s)", op_name,
                   x.device.type, str(x.dtype).removeprefix("torch."), backend, why)


_env_backend = os.environ.get("VIDSTREAM_BACKEND") or None
if _env_backend is not None:
    _check_name(_env_backend, "VIDSTREAM_BACKEND")

# The stack of use_backend blocks of this thread / task (innermost last).
_forced: contextvars.ContextVar[tuple] = contextvars.ContextVar("vidstream_backend", default=())


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    # None where the kernel serves every input its backend takes, else a function of the first
    # tensor argument giving why it does not serve it (None when it does): a default never picks
    # a kernel that would refuse the input, and a forced one says why before it runs.
    serves: Callable | None = None
    # Whether autograd can differentiate this implementation: a bool, or a function of no
    # arguments (a backward kernel may be missing from the build) giving None when it can, else
    # why not.
    differentiable: bool | Callable[[], str | None] = False

    def refuses(self, x) -> str | None:
        return None if self.serves is None or not isinstance(x, torch.Tensor) else self.serves(x)

    def no_backward(self) -> str | None:
        """None when this implementation has a backward here, else why not."""
        d = self.differentiable
        if callable(d):
            return d()
        return None if d else "it has no backward"


# Hashing sources on every op call would cost more than the op: one lookup per process and key.
_validated_cache: dict[tuple, bool] = {}
_arch_cache: dict[torch.device, str | None] = {}


def validated(op_name: str, backend_name: str, dtype: torch.dtype, arch: str | None) -> bool:
    """Whether the record validates ``backend_name``'s ``op_name`` for ``dtype`` on ``arch`` (an
    ``sm_XY``; None: unknown, nothing validated) with the sources running here."""
    key = (op_name, backend_name, dtype, arch)
    if key not in _validated_cache:
        from . import validation  # not at import: `python -m vidstream.validation` runs it as main

        _validated_cache[key] = validation.is_validated(op_name, backend_name, dtype, arch)
    return _validated_cache[key]


def device_arch(device: torch.device) -> str | None:
    """``sm_XY`` of a CUDA device, None where there is none."""
    if device not in _arch_cache:
        from . import validation

        _arch_cache[device] = validation.arch_of(device)
    return _arch_cache[device]


# torch.compile calls these once when tracing and keeps the result (see forced() below).
validated._dynamo_marked_constant = True
device_arch._dynamo_marked_constant = True
_CUDA = torch.device("cuda")


class Op:
    """One op's implementations, by backend name, and the choice among them."""

    def __init__(self, name: str):
        self.name = name
        self.impls: dict[str, Implementation] = {}

    def register(self, backend: str, fn: Callable, *, serves: Callable | None = None) -> Callable:
        self.impls[_check_name(backend, "register")] = Implementation(
            fn, serves, backend in DIFFERENTIABLE)
        return fn

    def mark_differentiable(self, backend: str, when: bool | Callable[[], str | None] = True):
        """Marks ``backend``'s implementation as one autograd differentiates (``when``: True, or
        a function giving None when its backward can run here, else why not)."""
        impl = self.impls[_check_name(backend, "mark_differentiable")]
        self.impls[backend] = Implementation(impl.fn, impl.serves, when)

    def no_backward(self, backend: str) -> str | None:
        """None when ``backend``'s implementation of this op gives gradients here, else why not."""
        if backend not in self.impls:
            return "it has no kernel for this op"
        if backend in DIFFERENTIABLE:  # PyTorch's own ops: autograd differentiates them
            return None
        return self.impls[backend].no_backward()

    def has_backward(self, backend: str) -> bool:
        return self.no_backward(backend) is None

    def impl(self, backend: str) -> Callable:
        """The implementation of one backend: for an op composed of another on the same backend."""
        return self.impls[backend].fn

    def available(self, device, dtype) -> list[str]:
        return [b for b in self.impls if usable(b, self.name, device, dtype) is None]

    def resolve_name(self, x: torch.Tensor, grad: bool = False) -> str:
        """The backend that runs this op on inputs like ``x``; a ``ValueError`` naming the
        available ones where the forced backend cannot. ``grad``: a gradient will be asked of the
        result (``needs_grad``), which only implementations with a backward give
        (``has_backward``)."""
        chosen = forced()
        if chosen is None:
            name = self.default_name(x)
            why = "the default"
            if grad and not self.has_backward(name):
                # A result without a gradient would be a silent wrong answer, so an op whose
                # default kernel has no backward here runs on PyTorch's own ops instead.
                name, why = self._torch_or_reference(x.device, x.dtype), "gradients needed"
            if _logging():
                _log_choice(self.name, x, name, why)
            return name
        why = "it has no kernel for this op" if chosen not in self.impls else (
            usable(chosen, self.name, x.device, x.dtype) or self.impls[chosen].refuses(x))
        if why is None and grad and not self.has_backward(chosen):
            why = (f"vidstream.{self.name} has no backward on the {chosen!r} backend "
                   f"({self.no_backward(chosen)}) and these inputs require grad (run training on "
                   f"a backend with a backward: {', '.join(self.differentiable_backends(x))}; or "
                   f"call it under torch.no_grad())")
        if why is not None:
            avail = ", ".join(self.available(x.device, x.dtype))
            raise ValueError(
                f"backend {chosen!r} cannot run vidstream.{self.name} on {x.dtype} {x.device.type} "
                f"tensors: {why}. Available for these inputs: {avail}")
        if _logging():
            _log_choice(self.name, x, chosen, "forced by use_backend / VIDSTREAM_BACKEND")
        return chosen

    def differentiable_backends(self, x) -> list[str]:
        """The backends that can run this op on inputs like ``x`` and give its gradients."""
        return [b for b in self.available(x.device, x.dtype) if self.has_backward(b)]

    def resolve(self, x: torch.Tensor, grad: bool = False) -> Callable:
        return self.impls[self.resolve_name(x, grad)].fn

    def default_name(self, x: torch.Tensor) -> str:
        """The backend the defaults pick for inputs like ``x``, whatever is forced."""
        if x.device.type == "cuda":
            return self.gpu_default(x.dtype, device_arch(x.device), x.device, x)
        if "cpu" in self.impls and usable("cpu", self.name, x.device, x.dtype) is None:
            return "cpu"
        return "reference"

    def gpu_default(self, dtype: torch.dtype, arch: str | None, device: torch.device = _CUDA,
                    x=None) -> str:
        """The default for CUDA tensors of ``dtype`` on a GPU of ``arch`` (and, given the input
        ``x``, a kernel that serves it)."""
        for name in _GPU_PREFERENCE:
            if name in self.impls and validated(self.name, name, dtype, arch) and usable(
                    name, self.name, device, dtype) is None and self.impls[name].refuses(x) is None:
                return name
        return self._torch_or_reference(device, dtype)

    def _torch_or_reference(self, device: torch.device, dtype: torch.dtype) -> str:
        """The fallback composed of PyTorch's own ops: ``torch`` where it can run, else the
        eager reference."""
        if "torch" in self.impls and usable("torch", self.name, device, dtype) is None:
            return "torch"
        return "reference"

    def explain_default(self, device: torch.device, dtype: torch.dtype) -> Default:
        """The default for tensors of this device and dtype, and why."""
        if device.type == "cuda":
            return self._explain_gpu_default(device, dtype)
        name = self.default_name(_Like(device, dtype))
        if name == "cpu":
            return Default(name, "the C++ kernel")
        why = usable("cpu", self.name, device, dtype) if "cpu" in self.impls else "no cpu kernel"
        return Default(name, f"the cpu backend cannot: {why}")

    def _explain_gpu_default(self, device: torch.device, dtype: torch.dtype) -> Default:
        from . import validation

        arch = device_arch(device)
        name = self.gpu_default(dtype, arch, device)
        if name in _GPU_PREFERENCE:
            return Default(name, validation.explain(self.name, name, dtype, arch))
        kernels = [g for g in _GPU_PREFERENCE if g in self.impls]
        if arch is None:
            why = f"no CUDA device here, so no {'/'.join(kernels)} kernel counts as validated"
        else:
            notes = [f"{g}: validated, but cannot run here: {usable(g, self.name, device, dtype)}"
                     if validated(self.name, g, dtype, arch)
                     else f"{g}: {validation.explain(self.name, g, dtype, arch)}" for g in kernels]
            why = (f"no {'/'.join(kernels)} kernel validated on {arch} for "
                   f"{validation.dtype_name(dtype)} ({'; '.join(notes)})")
        if name == "reference":
            why += f"; torch: {usable('torch', self.name, device, dtype) or 'not registered'}"
        return Default(name, why)


class Default(NamedTuple):
    """The backend an op gets by default, and why (``str()``: ``"backend: why"``)."""

    backend: str
    why: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.why}"


@dataclass(frozen=True)
class _Like:
    """What ``default_name`` reads of a tensor."""

    device: torch.device
    dtype: torch.dtype


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


def default_backends(device: str | torch.device = "cuda",
                     dtype: torch.dtype = torch.float16) -> dict[str, Default]:
    """Per op, the backend tensors of ``device`` and ``dtype`` get by default, and why. Works
    without CUDA: then it says what a CUDA tensor would get (no architecture, nothing validated)."""
    device = torch.device(device)
    return {name: o.explain_default(device, dtype) for name, o in _ops.items()}


def backends(device: str | torch.device | None = None) -> list[str]:
    """The backends usable here: for ``device`` if given, else for CPU and (if present) CUDA."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    return [name for name in NAMES if any(
        usable(name, o.name, d, torch.float32) is None for d in devices for o in _ops.values()
        if name in o.impls)]
