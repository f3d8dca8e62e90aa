"""What tests and benchmarks ask of the kernel registry: which backends an op has, whether one
can run here, and which implementation a backend registered. Public, so that test code never
reaches into the registry's private state."""

from __future__ import annotations

from typing import Callable

import torch

from . import backend


def registered_backends(op: str) -> list[str]:
    """The backends with an implementation of ``op`` (whether or not they can run here)."""
    return list(backend.op(op).impls)


def ops() -> list[str]:
    """Every registered op name."""
    return list(backend.ops())


def why_not(backend_name: str, op: str, device, dtype: torch.dtype) -> str | None:
    """None when ``backend_name`` has ``op`` and can run it on this device and dtype here, else
    the reason."""
    if backend_name not in backend.op(op).impls:
        return f"{backend_name} has no kernel for {op}"
    return backend.usable(backend_name, op, torch.device(device), dtype)


def implementation(op: str, backend_name: str) -> Callable:
    """The function ``backend_name`` registered for ``op``."""
    return backend.op(op).impl(backend_name)


def gpu_validated(op: str, backend_name: str) -> bool:
    """Whether ``backend_name``'s kernel for ``op`` has passed the suite on a real GPU."""
    impl = backend.op(op).impls.get(backend_name)
    return impl is not None and impl.gpu_validated
