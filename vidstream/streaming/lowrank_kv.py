"""``LowRankKV``: the projections of a VideoMLA-style latent KV cache, and their construction
from a dense K/V projection by a truncated SVD (no training).

Per token the cache keeps ``c = W_dc x + b_dc`` (``rank`` values shared by all heads) and a
positional key ``k_r = W_kr x + b_kr`` (``rope_dims`` values shared by all heads; the caller
applies the 3D RoPE to it). Head ``h`` sees ``k_h = concat(c @ w_uk[h], k_r)`` and
``v_h = c @ w_uv[h]`` (docs/spec.md §4).

``from_dense`` takes the dense projections in nn.Linear's ``[out, in]`` layout: the ``nn.Linear``
modules themselves (their weights and biases), their weights ``w_k [H*D, dim]``, ``w_v [H*Dv,
dim]`` with ``heads=H`` (the rows are split into ``H`` heads of consecutive rows, the layout of
``k.unflatten(-1, (H, D))``), or ``[H, D, dim]`` / ``[H, Dv, dim]`` tensors (no ``heads``
needed). For example, Wan2.1's ``self_attn.k`` and ``self_attn.v``:
``LowRankKV.from_dense(attn.k, attn.v, rank=192, rope_dims=32, heads=12)``.

Construction:

1. Positional part. The last ``rope_dims`` channels of every head become the shared key; the
   shared projection is the mean over heads of those rows (and biases), the least-squares
   choice: for any input, ``sum_h |W_k[h, rope] x - W_kr x|^2`` is smallest at the mean. It is
   exact when the heads' positional rows agree; otherwise the per-head deviation is lost (the
   benchmark reports that error on its own).
2. Latent part. The non-positional K rows of all heads and all V rows are stacked,
   ``M = [W_k_nope; W_v]`` ([H*(D - rope_dims) + H*Dv, dim]); a bias becomes one more input
   column (``[M | b]`` acting on ``[x; 1]``), so it is carried exactly at full rank. The SVD
   ``U S V^T`` truncated to ``rank`` gives ``W_dc = sqrt(S) V^T`` and the up-projections
   ``sqrt(S) U^T`` split by head (the square root balances the magnitudes of the latent and the
   weights, which matters when the latent is cached in 16-bit). This is the rank-``rank``
   approximation of the joint K/V map with the least error for isotropic inputs (Eckart-Young);
   at ``rank = min(rows, dim + has_bias)`` it reproduces the dense projection.

A Wan2.1 layer rotates all 128 channels of each head; after conversion only the ``rope_dims``
positional channels (and the matching query channels) should be rotated, so a converted model
is an initialisation that short fine-tuning or distillation refines, not a drop-in copy.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.lowrank import lowrank_decompress


class LowRankKV(nn.Module):
    """Down-projection of hidden states ``x`` [B, L, dim] to the cached ``(c, k_r)`` and the
    per-head up-projections ``w_uk`` [H, rank, D - rope_dims], ``w_uv`` [H, rank, Dv]."""

    def __init__(self, dim: int, heads: int, head_dim: int, rank: int, rope_dims: int = 0,
                 v_head_dim: int | None = None, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not 0 <= rope_dims <= head_dim:
            raise ValueError(f"rope_dims must be in [0, head_dim={head_dim}], got {rope_dims}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.dim, self.heads, self.head_dim, self.v_head_dim = dim, heads, head_dim, v_head_dim
        self.rank, self.rope_dims = rank, rope_dims
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, rank + rope_dims, bias=bias, **kw)
        self.w_uk = nn.Parameter(torch.randn(heads, rank, head_dim - rope_dims, **kw) * rank**-0.5)
        self.w_uv = nn.Parameter(torch.randn(heads, rank, v_head_dim, **kw) * rank**-0.5)

    @property
    def cache_values_per_token(self) -> int:
        """Values cached per token and layer: rank + rope_dims (dense: 2 * H * D)."""
        return self.rank + self.rope_dims

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(c [B, L, rank], k_r [B, L, rope_dims] or None): what the cache stores for hidden
        states ``x`` [B, L, dim]."""
        y = self.down(x)
        c = y[..., : self.rank]
        return c, (y[..., self.rank:] if self.rope_dims else None)

    def decompress(self, c: torch.Tensor,
                   k_r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full K [B, L, H, D] and V [B, L, H, Dv] of latents c [B, L, rank] (k_r [B, L, d_r]).
        Differentiable: where a gradient is needed the op runs on a differentiable backend."""
        ranges = torch.tensor([[0, c.shape[1]]], dtype=torch.int32)
        return lowrank_decompress(c, self.w_uk.to(c.dtype), self.w_uv.to(c.dtype), ranges, k_r)

    @classmethod
    def from_dense(cls, w_k: torch.Tensor | nn.Linear, w_v: torch.Tensor | nn.Linear, rank: int,
                   rope_dims: int = 0, *, heads: int | None = None, b_k: torch.Tensor | None = None,
                   b_v: torch.Tensor | None = None) -> LowRankKV:
        """A ``LowRankKV`` approximating the dense projections ``k = w_k x + b_k``,
        ``v = w_v x + b_v`` by a truncated SVD (no training).

        Args:
            w_k, w_v: the key and value projections in nn.Linear's ``[out, in]`` layout: the
                ``nn.Linear`` modules (their biases are used), their weights ``[H*D, dim]`` and
                ``[H*Dv, dim]`` (then ``heads`` is required: rows ``h*D .. (h+1)*D - 1`` are
                head ``h``), or ``[H, D, dim]`` and ``[H, Dv, dim]``.
            rank: latent values cached per token (``d_c``), in ``[1, rank bound]``.
            rope_dims: the last ``rope_dims`` channels of each key head become the positional
                key ``k_r`` shared by all heads (``d_r``); 0 for none.
            heads: the head count ``H``, for 2-D weights.
            b_k, b_v: biases ``[H*D]`` / ``[H*Dv]`` of weight tensors (not with modules).

        ``k_r`` needs RoPE applied by the caller; see the module docstring for the construction
        and docs/spec.md §4 for how the ops use the result."""
        return cls.from_dense_ranks(w_k, w_v, [rank], rope_dims, heads=heads, b_k=b_k, b_v=b_v)[0]

    @classmethod
    def from_dense_ranks(cls, w_k, w_v, ranks, rope_dims: int = 0, *, heads=None, b_k=None,
                         b_v=None) -> list[LowRankKV]:
        """``from_dense`` for each rank of ``ranks``, sharing one SVD."""
        w_k, w_v, b_k, b_v = _dense_heads(w_k, w_v, heads, b_k, b_v)
        H, D, dim = w_k.shape
        Dv = w_v.shape[1]
        if isinstance(rope_dims, bool) or not isinstance(rope_dims, int) or not 0 <= rope_dims <= D:
            raise ValueError(f"rope_dims must be an int in [0, head_dim={D}], got {rope_dims!r}")
        d_nope = D - rope_dims
        has_bias = b_k is not None or b_v is not None
        f64 = dict(dtype=torch.float64, device=w_k.device)
        bk = b_k.to(**f64) if b_k is not None else torch.zeros(H, D, **f64)
        bv = b_v.to(**f64) if b_v is not None else torch.zeros(H, Dv, **f64)
        wk, wv = w_k.to(**f64), w_v.to(**f64)
        m = torch.cat([wk[:, :d_nope].reshape(-1, dim), wv.reshape(-1, dim)])
        if has_bias:
            m = torch.cat([m, torch.cat([bk[:, :d_nope].reshape(-1), bv.reshape(-1)])[:, None]], 1)
        full = min(m.shape)
        for rank in ranks:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
                raise ValueError(f"rank must be an int in [1, {full}] (the rank bound of the stacked "
                                 f"K/V projection [{m.shape[0]}, {m.shape[1]}]), got {rank!r}")
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        modules = []
        for rank in ranks:
            root = s[:rank].sqrt()
            down = root[:, None] * vh[:rank]  # [rank, dim (+1)]
            up = (u[:, :rank] * root[None]).T  # [rank, rows]
            out = cls(dim, H, D, rank, rope_dims, Dv, bias=has_bias, device=w_k.device,
                      dtype=w_k.dtype)
            with torch.no_grad():
                out.down.weight.copy_(torch.cat([down[:, :dim], wk[:, d_nope:].mean(0)]))
                if has_bias:
                    out.down.bias.copy_(torch.cat([down[:, dim], bk[:, d_nope:].mean(0)]))
                out.w_uk.copy_(up[:, : H * d_nope].reshape(rank, H, d_nope).permute(1, 0, 2))
                out.w_uv.copy_(up[:, H * d_nope:].reshape(rank, H, Dv).permute(1, 0, 2))
            modules.append(out)
        return modules


def _linear_weight(w, b, w_name: str, b_name: str):
    """An ``nn.Linear`` ``w`` as (its weight, its bias); a tensor as it is."""
    if not isinstance(w, nn.Linear):
        return w, b
    if b is not None:
        raise ValueError(f"{b_name} must be None when {w_name} is an nn.Linear (its bias is used)")
    return w.weight.detach(), None if w.bias is None else w.bias.detach()


def _dense_heads(w_k, w_v, heads, b_k, b_v):
    """w_k [H, D, dim], w_v [H, Dv, dim], b_k [H, D] or None, b_v [H, Dv] or None."""
    w_k, b_k = _linear_weight(w_k, b_k, "w_k", "b_k")
    w_v, b_v = _linear_weight(w_v, b_v, "w_v", "b_v")
    if not isinstance(w_k, torch.Tensor) or w_k.dim() not in (2, 3):
        raise ValueError("w_k must be an nn.Linear, its weight [H*D, dim] or a tensor [H, D, dim]")
    if not isinstance(w_v, torch.Tensor) or w_v.dim() != w_k.dim():
        raise ValueError(f"w_v must have w_k's layout ({w_k.dim()}-D), got "
                         f"{tuple(w_v.shape) if isinstance(w_v, torch.Tensor) else type(w_v)}")
    if w_k.dim() == 2:
        if heads is None:
            raise ValueError(f"heads must be given when w_k is 2-D {list(w_k.shape)} (nn.Linear's "
                             "[H*D, dim] weight): pass heads=H to split its rows into H heads, or "
                             "give w_k as [H, D, dim]")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be an int >= 1, got {heads!r}")
        if w_k.shape[0] % heads or w_v.shape[0] % heads:
            hint = ""
            if not (w_k.shape[1] % heads or w_v.shape[1] % heads):
                hint = ("; they look like [dim, H*D] (the x @ W layout): pass w_k.T and w_v.T, "
                        "nn.Linear's [out, in]")
            raise ValueError(f"w_k rows ({w_k.shape[0]}) and w_v rows ({w_v.shape[0]}) must be "
                             f"multiples of heads = {heads}{hint}")
        w_k = w_k.reshape(heads, -1, w_k.shape[1])
        w_v = w_v.reshape(heads, -1, w_v.shape[1])
    if w_v.shape[0] != w_k.shape[0] or w_v.shape[2] != w_k.shape[2]:
        raise ValueError(f"w_v must have w_k's heads and input dim ({w_k.shape[0]}, "
                         f"{w_k.shape[2]}), got {tuple(w_v.shape)}")
    if b_k is not None:
        if b_k.numel() != w_k.shape[0] * w_k.shape[1]:
            raise ValueError(f"b_k must have {w_k.shape[0] * w_k.shape[1]} values, got {b_k.numel()}")
        b_k = b_k.reshape(w_k.shape[:2])
    if b_v is not None:
        if b_v.numel() != w_v.shape[0] * w_v.shape[1]:
            raise ValueError(f"b_v must have {w_v.shape[0] * w_v.shape[1]} values, got {b_v.numel()}")
        b_v = b_v.reshape(w_v.shape[:2])
    return w_k, w_v, b_k, b_v


def dense_kv(x: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, heads: int,
             b_k: torch.Tensor | None = None,
             b_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense K [B, L, H, D] and V [B, L, H, Dv] of x [B, L, dim] (to measure the error)."""
    k = torch.nn.functional.linear(x, w_k.reshape(-1, x.shape[-1]),
                                   None if b_k is None else b_k.reshape(-1))
    v = torch.nn.functional.linear(x, w_v.reshape(-1, x.shape[-1]),
                                   None if b_v is None else b_v.reshape(-1))
    return k.unflatten(-1, (heads, -1)), v.unflatten(-1, (heads, -1))


def reconstruction_error(module: LowRankKV, x, w_k, w_v, b_k=None, b_v=None) -> dict:
    """Relative Frobenius errors |approx - dense| / |dense| on activations x [B, L, dim] of K
    (whole, non-positional and positional channels) and V."""
    k, v = dense_kv(x, w_k, w_v, module.heads, b_k, b_v)
    c, k_r = module(x)
    with torch.no_grad():
        k_a, v_a = module.decompress(c, k_r)

    def rel(a, b):
        return float((a - b).norm() / b.norm()) if b.numel() else 0.0

    dn = module.head_dim - module.rope_dims
    return {"k": rel(k_a, k), "k_nope": rel(k_a[..., :dn], k[..., :dn]),
            "k_rope": rel(k_a[..., dn:], k[..., dn:]), "v": rel(v_a, v)}
