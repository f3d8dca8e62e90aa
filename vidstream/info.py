"""``vidstream info``: what this install of vidstream is, what it was built against and what runs
where, as plain text to paste into a bug report (in the spirit of ``python -m xformers.info``).

    python -m vidstream.info
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch

import vidstream

from . import _extension, validation
from .backend import default_backends

# One dtype per device for the table: what the demo runs in there. `vidstream backends --device D
# --dtype T` gives any other.
_TABLE = (("cpu", torch.float32), ("cuda", torch.bfloat16))


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _install() -> str:
    root = _extension.source_root()
    if root is not None:
        return f"source checkout {root}"
    return f"installed package {_extension.PACKAGE}"


def _torch_lines() -> list[str]:
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    lines = [f"torch:            {torch.__version__} ({cuda}), running"]
    info = _extension.build_info()
    if info is None:
        lines.append("  _C built with:  unknown (no vidstream/_build_info.json: not built, or built by "
                     "an older setup.py)")
        return lines
    built_cuda = f"CUDA {info['torch_cuda']}" if info.get("torch_cuda") else "CPU-only"
    same = info.get("torch") == torch.__version__ and info.get("torch_git") in (
        None, getattr(torch.version, "git_version", None))
    lines.append(f"  _C built with:  torch {info.get('torch')} ({built_cuda}), Python {info.get('python')}"
                 f" -- {'the running torch' if same else 'NOT the running torch: rebuild or reinstall'}")
    return lines


def _extension_lines() -> list[str]:
    loaded = _extension.load()
    lines = [f"vidstream._C:     {'loaded' if loaded else 'NOT loaded'}"]
    if not loaded:
        lines.append(f"  why:            {_extension.failure()}")
    info = _extension.build_info() or {}
    if loaded:
        if _extension.built_with_cuda():
            arch = info.get("cuda_arch_list") or "unrecorded arch list"
            lines.append(f"  CUDA kernels:   built, for TORCH_CUDA_ARCH_LIST={arch}")
        else:
            lines.append("  CUDA kernels:   not built (a CPU-only build: VIDSTREAM_BUILD_CUDA, nvcc)")
        lines.append(f"  CPU kernels:    built; this CPU: {torch.backends.cpu.get_cpu_capability()}, "
                     f"{torch.get_num_threads()} threads")
    if info.get("cxx_flags"):
        lines.append(f"  C++ flags:      {' '.join(info['cxx_flags'])}")
    if info.get("nvcc_flags"):
        lines.append(f"  nvcc flags:     {' '.join(info['nvcc_flags'])}")
    env = os.environ.get(_extension.REQUIRE_ENV)
    lines.append(f"  strict load:    {_extension.REQUIRE_ENV}={env if env is not None else '(unset)'}: "
                 f"{'a failed load is an error' if _extension.required() else 'a failed load warns'}")
    return lines


def _cuda_lines() -> list[str]:
    if not torch.cuda.is_available():
        why = "this torch is CPU-only" if torch.version.cuda is None else "no CUDA device visible"
        return [f"CUDA:             not available ({why})"]
    lines = [f"CUDA:             available, {torch.cuda.device_count()} device(s); torch's arch list "
             f"{' '.join(torch.cuda.get_arch_list())}"]
    for i in range(torch.cuda.device_count()):
        lines.append(f"  cuda:{i}:         {torch.cuda.get_device_name(i)} "
                     f"({validation.arch_of(torch.device('cuda', i))})")
    return lines


def _triton_line() -> str:
    if importlib.util.find_spec("triton") is None:
        return "Triton:           missing (not installed: `pip install triton`); the triton backend is off"
    version = _dist_version("triton", "pytorch-triton", "triton-xpu") or "unknown version"
    from . import triton_kernels

    mode = triton_kernels.mode()
    if mode == "gpu":
        what = "gpu (compiled kernels on CUDA tensors)"
    elif mode == "interpret":
        what = "interpreter (TRITON_INTERPRET=1: CPU tensors, slow; for tests)"
    else:
        what = ("unusable here: no CUDA device, and TRITON_INTERPRET is not 1 (set it to run the "
                "kernels on CPU tensors through the interpreter)")
    return f"Triton:           {version}, mode {what}"


def _default_lines() -> list[str]:
    from . import backend

    forced = backend.forced()
    head = "Default backends" + (f" (overridden: VIDSTREAM_BACKEND={forced})" if forced else "")
    lines = [head + "; other dtypes: `vidstream backends --device D --dtype T`"]
    for device, dtype in _TABLE:
        defaults = default_backends(device, dtype)
        width = max(map(len, defaults), default=0)
        lines.append(f"  {device} {validation.dtype_name(dtype)}:")
        lines += [f"    {op:<{width}}  {d.backend:<9}  {d.why}" for op, d in defaults.items()]
    return lines


def _validated_lines() -> list[str]:
    record = validation.load_record()
    if not record["entries"]:
        return [f"GPU-validated:    nothing ({validation.RECORD_NAME} has no entries): no cuda or "
                "triton kernel is a CUDA default; CUDA tensors run on the torch backend"]
    text = validation.show().splitlines()
    return [f"GPU-validated:    {text[0]}", *("  " + line.strip() for line in text[1:])]


def info_text() -> str:
    """The report, as text."""
    lines = [
        f"vidstream:        {vidstream.__version__} ({_install()})",
        f"Python:           {platform.python_version()} ({sys.platform}-{platform.machine()}), "
        f"{sys.executable}",
        *_torch_lines(),
        *_extension_lines(),
        *_cuda_lines(),
        _triton_line(),
        *_default_lines(),
        *_validated_lines(),
    ]
    return "\n".join(lines)


def main() -> int:
    print(info_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
