"""Shared pieces of the ops' backward passes (issue #14): readiness of the backward kernels, the
fold of an lse gradient into an attention backward kernel, token indices of ranges built on the
device (no host read, so a backward traces under torch.compile), and the scatter of per-token
gradients back into a pool.

Registration follows ``torch.library``: ``register_autograd(op, backward, setup_context=...)`` on
the C++ ops (``vidstream::X``) and on the Triton ops (``vidstream::X_triton``). The Triton ops'
autograd is registered when the Triton kernels are first needed with gradients
(``triton_backward``), so ``import vidstream`` never imports triton.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
from torch import Tensor

from .. import _extension

# ----------------------------------------------------------------------------- readiness


def kernel_backward(op: str, dispatch_key: str) -> Callable[[], str | None]:
    """A readiness check for a backend whose backward calls the C++ op ``vidstream::op``: None
    when that op has a ``dispatch_key`` kernel in the loaded extension, else why not."""

    def why_not() -> str | None:
        if _extension.has_kernel(op, dispatch_key):
            return None
        return f"vidstream._C has no {dispatch_key} kernel of {op} (rebuild with the backward kernels)"

    return why_not


_TRITON_HOOKS: dict[str, list[Callable[[], None]]] = {"light": [], "attention": []}
_triton_done: set = set()
_triton_why: dict[str, str | None] = {}


def on_triton(kind: str, fn: Callable[[], None]) -> Callable[[], None]:
    """Registers ``fn`` (the autograd registration of Triton ops) to run once, when the Triton
    backward is first needed: ``kind`` "light" for ops whose backward needs only triton
    (``rope3d``, ``lowrank_decompress``), "attention" for those that call the Triton attention
    backward kernels."""
    _TRITON_HOOKS[kind].append(fn)
    if _triton_why.get(kind, "") is None:
        _run(kind)
    return fn


def _run(kind: str) -> None:
    for fn in _TRITON_HOOKS[kind]:
        if fn not in _triton_done:
            _triton_done.add(fn)
            fn()


def triton_backward(kind: str) -> str | None:
    """None when the Triton backward of ``kind`` ("light" or "attention") can run here, its
    autograd then registered; else why not. torch.compile takes the result as a constant (it
    registers ops, which a traced graph cannot)."""
    if kind not in _triton_why:
        from .. import triton_kernels

        why = None
        if triton_kernels.mode() is None:
            why = "triton cannot run here"
        elif kind == "attention" and importlib.util.find_spec(
                "vidstream.triton_kernels.attention_backward") is None:
            why = ("the Triton attention backward kernels (triton_kernels/attention_backward.py) "
                   "are not there")
        if why is None:
            _run("light")
            if kind == "attention":
                _run("attention")
        _triton_why[kind] = why
    return _triton_why[kind]


triton_backward._dynamo_marked_constant = True  # as backend.forced: evaluated, not traced


def triton_ready(kind: str) -> Callable[[], str | None]:
    """The readiness check (``Op.mark_differentiable``) of a Triton implementation."""

    def why_not() -> str | None:
        return triton_backward(kind)

    return why_not


def register_triton_autograd() -> None:
    """Registers the autograd of every Triton op now (tests, opcheck); a no-op for the kinds
    that cannot run here."""
    triton_backward("light")
    triton_backward("attention")


# ----------------------------------------------------------------------------- attention


def fold_lse_grad(dout: Tensor | None, dlse: Tensor | None, v: Tensor, out: Tensor):
    """Exact fold of a gradient of the log-sum-exp into an attention backward kernel that
    computes ``Delta_i = rowsum(dout_i * out_i)`` from the ``dout`` and ``out`` it is given.

    ``d lse_i / d s_ij = P_ij``, so ``dS_ij = P_ij (dP_ij - Delta_i + dlse_i)``: the kernel's
    formula with ``Delta_i - dlse_i``. Extra value channels give exactly that: ``v`` gains zero
    channels (``dP`` unchanged, ``P @ v`` unchanged), ``out`` gains ``-dlse_i`` (split hi + lo in
    16 bits, so the kernel's float32 sum sees dlse to float32 precision) and ``dout`` ones. The
    extra channels of the returned dv are dropped by the caller. Returns (dout, v, out,
    extra_channels)."""
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        return dout, v, out, 0
    col = (-dlse.float()).transpose(1, 2).unsqueeze(-1)  # [B, L, H, 1]
    hi = col.to(out.dtype)
    cols = [hi] if out.dtype in (torch.float32, torch.float64) else [hi, (col - hi.float()).to(out.dtype)]
    n = len(cols)
    out2 = torch.cat([out, *cols], dim=-1)
    dout2 = torch.cat([dout, torch.ones_like(out2[..., -n:])], dim=-1)
    v2 = torch.cat([v, v.new_zeros(*v.shape[:3], n)], dim=-1)
    return dout2, v2, out2, n


def attention_grads(backward: Callable, dout, dlse, q, k, v, out, lse, *args):
    """(dq, dk, dv) from an attention backward kernel ``backward(dout, q, k, v, out, lse, *args)``,
    with the lse gradient folded in (``fold_lse_grad``)."""
    dout, v2, out2, n = fold_lse_grad(dout, dlse, v, out)
    dq, dk, dv = backward(dout.contiguous(), q, k, v2, out2, lse, *args)
    if n:
        dv = dv[..., : v.shape[3]]
    return dq, dk, dv


# ----------------------------------------------------------------------------- ranges


def token_index(kv_ranges: Tensor, num_tokens: int) -> Tensor:
    """The pool indices (int64 [num_tokens]) of the tokens of ``kv_ranges`` [R, 2], range by range
    in the order given, built on the ranges' device without reading them back."""
    r = kv_ranges.to(torch.int64)
    starts, lengths = r[:, 0], (r[:, 1] - r[:, 0]).clamp(min=0)
    begin = torch.cumsum(lengths, 0) - lengths  # first output position of each range
    rng = torch.repeat_interleave(torch.arange(r.shape[0], device=r.device), lengths,
                                  output_size=num_tokens)
    pos = torch.arange(num_tokens, device=r.device)
    return starts[rng] + (pos - begin[rng])


def scatter_tokens(grad: Tensor, idx: Tensor, pool_len: int) -> Tensor:
    """Per-token gradients ``grad`` [B, N, ...] into a zero pool gradient [B, P, ...] at ``idx``
    (ranges are disjoint, so every pool token receives at most one)."""
    out = grad.new_zeros(grad.shape[0], pool_len, *grad.shape[2:])
    return out.index_add(1, idx, grad)
