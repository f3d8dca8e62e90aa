"""Helpers every kernel test uses: where a backend runs, poisoned outputs, and the flash-attn
tolerance rule (a kernel's error against float64 at most about twice eager PyTorch's error in
the same dtype)."""

from __future__ import annotations

import pytest
import torch

import vidstream
from vidstream import testing

KERNEL_BACKENDS = ("cpu", "triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs() -> list:
    """(backend, device) for every kernel backend and device it could serve; tests skip the
    pairs that cannot run here via ``require``."""
    pairs = []
    for b in KERNEL_BACKENDS:
        for d in ("cpu", "cuda"):
            if b == "cpu" and d == "cuda" or b == "cuda" and d == "cpu":
                continue
            pairs.append(pytest.param(b, d, id=f"{b}-{d}"))
    return pairs


def require(backend: str, op: str, device: str, dtype: torch.dtype):
    """Skips the test when ``backend`` cannot run ``op`` on this device and dtype here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = testing.why_not(backend, op, device, dtype)
    if why is not None:
        pytest.skip(f"{backend} cannot run {op} here: {why}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills ``t`` with NaN so that any element a kernel fails to write fails the comparison."""
    return t.fill_(float("nan"))


def max_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |out - oracle| in float64; NaN anywhere counts as infinite error."""
    d = (out.double() - oracle.double()).abs()
    if d.numel() == 0:
        return 0.0
    if torch.isnan(d).any() or torch.isnan(out).any():
        return float("inf")
    return float(d.max())


def assert_close_to_oracle(out, oracle, eager, *, factor: float = 2.0, what: str = ""):
    """``out`` (kernel) and ``eager`` (eager PyTorch in the same dtype) against the float64
    ``oracle``: err(out) <= factor * err(eager) + twice the rounding of the output dtype.
    Where the oracle is not finite (an lse of -inf), ``out`` must match it exactly."""
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == eager.dtype, f"{what}: dtype {out.dtype} != {eager.dtype}"
    finite = torch.isfinite(oracle)
    if not bool(finite.all()):
        o, r = out.double()[~finite], oracle.double()[~finite]
        assert torch.equal(o, r), f"{what}: non-finite oracle entries differ: {o[:8]} vs {r[:8]}"
        out, oracle, eager = out[finite], oracle[finite], eager[finite]
    e_out, e_eager = max_err(out, oracle), max_err(eager, oracle)
    # An absolute floor of rounding size, or the comparison is a coin toss where eager's own
    # error is a single rounding (or, by luck, none): flash-attn's (twice the rounding of the
    # oracle's values near 0.3 in the output dtype), and at least two units in the last place of
    # the largest value.
    o = oracle.to(out.dtype)
    floor = 0.0
    if o.numel():
        floor = max(2 * float(((o + 0.3) - 0.3 - o).abs().max()),
                    2 * torch.finfo(out.dtype).eps * float(oracle.abs().max()))
    assert e_out <= factor * e_eager + floor, (
        f"{what}: kernel error {e_out:.3e} > {factor} x eager error {e_eager:.3e} + {floor:.1e}")


def run(backend: str, fn, *args, **kwargs):
    with vidstream.use_backend(backend):
        return fn(*args, **kwargs)
