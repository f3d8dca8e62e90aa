"""Ahead-of-time compile of the Triton attention kernels for sm_80 and sm_90 (PTX and cubin via
ptxas), without a GPU: catches what the interpreter cannot (dot shapes, layouts, shared memory).

    .venv/bin/python tools/triton_compile_attention.py
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must pick their GPU autotune configs

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from vidstream.triton_kernels import attention as A  # noqa: E402


def _signature(fn, consts, dtype):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n == "lse_ptr":
            sig[n] = "*fp32"
        elif n == "ranges_ptr":
            sig[n] = "*i32"
        elif n.endswith("_ptr"):
            sig[n] = f"*{dtype}"
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def main() -> int:
    failures = 0
    kernels = [(A._chunk_attention_kernel.fn, {"HAS_WINDOW": True}),
               (A._chunk_attention_kernel.fn, {"HAS_WINDOW": False}),
               (A._cached_attention_kernel.fn, {})]
    for fn, extra in kernels:
        for cap in (80, 90):
            for dtype in ("fp16", "bf16", "fp32"):
                for d in (64, 128):
                    consts = dict(D=d, DV=d, BLOCK_D=d, BLOCK_DV=d, IEEE=dtype == "fp32",
                                  BLOCK_M=128, BLOCK_N=64, **extra)
                    src = ASTSource(fn=fn, signature=_signature(fn, consts, dtype),
                                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
                    what = f"{fn.__name__} {extra} sm_{cap} {dtype} D={d}"
                    try:
                        c = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                           options=dict(num_warps=8, num_stages=2))
                        mma = "wgmma" if "wgmma" in c.asm["ptx"] else (
                            "mma.sync" if "mma.sync" in c.asm["ptx"] else "fma")
                        print(f"ok   {what}: {mma}, {c.metadata.shared} B shared")
                    except Exception as e:  # report every failure, then fail
                        failures += 1
                        print(f"FAIL {what}: {type(e).__name__}: {str(e)[:400]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
