"""Ahead-of-time compilation of Triton kernels for a GPU architecture, on a machine without one:
GPU-only lowering errors (layouts, dtypes the interpreter never sees, like bfloat16) show up in CI.
Runs in a subprocess because TRITON_INTERPRET is fixed when triton is first imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module, arch, specs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
mod = importlib.import_module(module)
target = GPUTarget("cuda", arch, 32)
for name, types, consts in specs:
    fn = getattr(mod, name)
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    out = triton.compile(ASTSource(fn, sig, consts), target=target)
    assert "cubin" in out.asm, name
print("ok")
"""


def assert_compiles(module: str, arch: int, specs: list, tmp_path) -> None:
    """``specs``: (kernel name, {arg: triton type} for non-int32 args, {constexpr: value})."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _SCRIPT, module, str(arch), json.dumps(specs)],
                         env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas for ahead-of-time compilation")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
