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


def gpu_validated(op: str, backend_name: str, dtype: torch.dtype | str | None = None,
                  arch: str | None = None) -> bool:
    """Whether the record ``vidstream/validated.json`` validates ``backend_name``'s kernel for
    ``op`` with the sources running here: for ``dtype`` (None: any) on ``arch`` (``sm_XY``; None:
    this machine's GPU, so always False without one)."""
    from . import validation

    arch = arch or backend.device_arch(torch.device("cuda"))
    dtypes = validation.DTYPES if dtype is None else (validation.dtype_name(dtype),)
    return any(validation.is_validated(op, backend_name, d, arch) for d in dtypes)
