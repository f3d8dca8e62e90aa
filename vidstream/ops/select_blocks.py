"""Top-k mid-block selection (docs/spec.md §5): ``select_blocks``, the scores behind it
(``block_scores``) and the per-block key sums a cache can keep (``block_key_sums``).

Every backend returns (scores float32 [M], indices int64 [min(k, M)]); the public function keeps
the indices. The kernels never form ``QK^T``: ``"mean"`` factorises as
``sum_i q_i · sum_j k_j``, ``"max"`` needs one dot product per key with the mean sampled query.
Kernels: ``csrc/{cpu,cuda}/select_blocks.cpp``, ``csrc/kernels/select_blocks.*``,
``triton_kernels/select_blocks.py``.
"""

from __future__ import annotations

import torch

from .. import _extension, backend
from . import checks
from .attention import range_deltas
from .metadata import TokenRanges
from .rope_math import rope_bands, rotate_pairs, temporal_angles

SELECT_BLOCKS = backend.op("select_blocks")


# ----------------------------------------------------------------------------- public ops


def select_blocks(q: torch.Tensor, k_pool: torch.Tensor, block_ranges, k: int, *,
                  query_stride: int = 8, heads=None, score: str = "mean",
                  scale: float | None = None, block_key_sums: torch.Tensor | None = None,
                  block_deltas=None, theta: float = 10000.0,
                  t_theta: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k mid-block selection (PackForcing's dynamic context selection): the indices (int64
    ``[min(k, M)]``, ascending, on q's device) of the ``k`` blocks of ``block_ranges`` whose keys
    match the current chunk's queries best. Ties go to the smaller block index.

    Args:
        q: the chunk's queries ``[B, Lq, H, D]`` (tokens before heads); every
            ``query_stride``-th query is sampled.
        k_pool: the cached keys ``[B, P, H_kv, D]``.
        block_ranges: ``[M, 2]`` token ranges, block ``m`` being the tokens of range ``m``.
        k: blocks to keep (>= 0; ``k >= M`` keeps all).
        heads: query-head indices to score on; default the first half of the heads.
        score: ``"mean"``: the mean over sampled queries and heads of the summed scaled dot
            products with the block's keys; ``"max"``: of the mean query's largest dot product
            with one of the block's keys. An empty block scores 0 ("mean") or -inf ("max").
        scale: default ``D ** -0.5``.

    ``block_key_sums`` [M, H_kv, D] (batch 1) or [B, M, H_kv, D], any float dtype (float32
    recommended): the sum over each block's tokens of its keys, as a cache can keep it when it
    writes a block (``block_key_sums(k_pool, block_ranges)`` or ``k_block.sum(1)``). With it,
    ``score="mean"`` costs O(M * H * D) and does not read the keys; ``score="max"`` needs every
    key and ignores it (it is still checked).

    ``block_deltas``: None, or per-block temporal offsets in frames (as ``kv_deltas`` of
    ``cached_attention``; ``theta``/``t_theta`` the keys' RoPE): block ``m`` is scored as if its
    keys (and its key sum) were ``rope3d_shift_``-ed by ``block_deltas[m]``, so selection sees the
    keys where attention will see them. Indices are not differentiable. Definition:
    docs/spec.md §5."""
    blocks, heads, sums, query_stride = _check_select_blocks(
        q, k_pool, block_ranges, k, query_stride, heads, score, block_key_sums)
    deltas = range_deltas(block_deltas, blocks, k_pool, t_theta, theta, "block_deltas")
    scale = checks.scale_value(scale, q.shape[3])
    fn = SELECT_BLOCKS.resolve(q)
    q, k_pool = checks.rows_contiguous(q), checks.rows_contiguous(k_pool)
    return fn(q, k_pool, blocks, k, query_stride, heads, score, scale, sums,
              *_rope_args(deltas, theta, t_theta))[1]


def _rope_args(deltas, theta, t_theta) -> tuple:
    """The trailing (deltas, theta, t_theta) arguments of a backend, none without offsets."""
    return () if deltas is None else (deltas, float(theta), t_theta)


def block_scores(q: torch.Tensor, k_pool: torch.Tensor, block_ranges, *, query_stride: int = 8,
                 heads=None, score: str = "mean", scale: float | None = None,
                 block_key_sums: torch.Tensor | None = None, block_deltas=None,
                 theta: float = 10000.0, t_theta: torch.Tensor | None = None) -> torch.Tensor:
    """The scores ``s_m`` ``[M]`` that ``select_blocks`` ranks (same arguments, without ``k``):
    float32 from a kernel, q's dtype from the reference backend. Definition: docs/spec.md §5."""
    blocks, heads, sums, query_stride = _check_select_blocks(
        q, k_pool, block_ranges, 0, query_stride, heads, score, block_key_sums)
    deltas = range_deltas(block_deltas, blocks, k_pool, t_theta, theta, "block_deltas")
    scale = checks.scale_value(scale, q.shape[3])
    fn = SELECT_BLOCKS.resolve(q)
    q, k_pool = checks.rows_contiguous(q), checks.rows_contiguous(k_pool)
    return fn(q, k_pool, blocks, 0, query_stride, heads, score, scale, sums,
              *_rope_args(deltas, theta, t_theta))[0]


def block_key_sums(k_pool: torch.Tensor, block_ranges) -> torch.Tensor:
    """float32 [B, M, H_kv, D]: the sum of the keys of each block of ``block_ranges`` (float64
    for float64 keys). A cache computes this once when it writes a block (``k_block.sum(1,
    dtype=torch.float32)`` is the same thing for one block). One plain reduction per block, so
    equal blocks get bitwise-equal sums on every device (no atomics)."""
    checks.tensor(k_pool, "k_pool", 4, "[B, P, H_kv, D]")
    checks.floating(k_pool, "k_pool")
    blocks = checks.ranges(block_ranges, k_pool.shape[1], "block_ranges", k_pool.device)
    acc = torch.float64 if k_pool.dtype == torch.float64 else torch.float32
    B, _, H_kv, D = k_pool.shape
    out = torch.zeros(B, len(blocks), H_kv, D, dtype=acc, device=k_pool.device)
    for m, (s, e) in enumerate(blocks._host()):
        if e > s:
            out[:, m] = k_pool[:, s:e].sum(1, dtype=acc)
    return out


# ----------------------------------------------------------------------------- input checks


@checks.layout_hint(q="[B, Lq, H, D]", k_pool="[B, P, H_kv, D]")
def _check_select_blocks(q, k_pool, block_ranges, k, query_stride, heads, score,
                         block_key_sums=None) -> tuple:
    """(block ranges on q's device, the list of query heads, the key sums as [B, M, H_kv, D] or
    None, the query stride bounded by the sequence)."""
    checks.tensor(q, "q", 4, "[B, Lq, H, D]")
    checks.tensor(k_pool, "k_pool", 4, "[B, P, H_kv, D]")
    checks.floating(q, "q")
    checks.same("q", q, "k_pool", k_pool)
    if k_pool.shape[0] != q.shape[0] or k_pool.shape[3] != q.shape[3]:
        checks.fail(f"k_pool must have q's batch and head dim ({q.shape[0]}, {q.shape[3]}), "
                    f"got ({k_pool.shape[0]}, {k_pool.shape[3]})")
    checks.gqa(q.shape[2], k_pool.shape[2], "k_pool")
    blocks = checks.ranges(block_ranges, k_pool.shape[1], "block_ranges", q.device)
    checks.positive_int(k, "k", minimum=0)
    checks.positive_int(query_stride, "query_stride")
    if score not in ("mean", "max"):
        checks.fail(f"score must be 'mean' or 'max', got {score!r}")
    H = q.shape[2]
    if heads is None:
        heads = list(range(max(1, H // 2)))
    else:
        if not isinstance(heads, (list, tuple, range)):
            checks.fail_type(f"heads must be a list of ints (query head indices), got {heads!r}")
        heads = list(heads)
        if any(isinstance(h, bool) or not isinstance(h, int) for h in heads):
            checks.fail_type(f"heads must be a list of ints, got {heads}")
        if not heads or any(h < 0 or h >= H for h in heads) or len(set(heads)) != len(heads):
            checks.fail(f"heads must be distinct query head indices in [0, {H}), got {heads}")
    if q.shape[1] == 0:
        checks.fail("q must have at least one query token (Lq >= 1)")
    sums = None
    if block_key_sums is not None:
        sums = _check_key_sums(block_key_sums, q.shape[0], len(blocks), k_pool.shape[2],
                               q.shape[3], q.device)
    # A stride past the sequence samples query 0 alone; bounding it here keeps every backend's
    # index arithmetic (stride * sample) inside int64.
    return blocks, heads, sums, min(query_stride, max(q.shape[1], 1))


def _check_key_sums(s, batch: int, blocks: int, kv_heads: int, head_dim: int, device) -> torch.Tensor:
    """Per-block key sums [M, H_kv, D] (batch 1) or [B, M, H_kv, D]; returned as 4-D."""
    want = f"[M, H_kv, D] = [{blocks}, {kv_heads}, {head_dim}] (batch 1) or [B, M, H_kv, D] = " \
           f"[{batch}, {blocks}, {kv_heads}, {head_dim}]"
    if not isinstance(s, torch.Tensor):
        checks.fail(f"block_key_sums must be a tensor {want}, got {type(s).__name__}")
    if s.dim() == 3 and batch == 1:
        s = s.unsqueeze(0)
    if tuple(s.shape) != (batch, blocks, kv_heads, head_dim):
        checks.fail(f"block_key_sums must have shape {want}, got {tuple(s.shape)}")
    checks.floating(s, "block_key_sums")
    if s.device != device:
        checks.fail(f"block_key_sums must be on the device of q ({device}), got {s.device}")
    return s


# ----------------------------------------------------------------------------- reference


def shift_blocks(x: torch.Tensor, deltas, theta, t_theta, kv_t: torch.Tensor,
                 per_token: bool) -> torch.Tensor:
    """Block rows ``x`` moved by their block's offset as ``rope3d_shift_`` moves keys: ``x``
    [B, M, Hs, D] (key sums) or, with ``per_token``, [B, M, width, Hs, D] (gathered keys); the
    scored heads' kv heads ``kv_t`` pick each one's ``t_theta``. Identity without offsets."""
    if deltas is None:
        return x
    c_t = rope_bands(x.shape[-1])[0]
    ang = temporal_angles(deltas.to(x.device, torch.float64), c_t, theta, t_theta)  # [M, Ht, c_t]
    if ang.shape[1] > 1:
        ang = ang[:, kv_t]
    ang = ang[:, None] if per_token else ang
    band = rotate_pairs(x[..., : 2 * c_t], ang)
    return torch.cat([band, x[..., 2 * c_t:]], dim=-1)


def block_scores_eager(q, k_pool, blocks: TokenRanges, query_stride, heads, score, scale,
                       key_sums=None, deltas=None, theta=10000.0, t_theta=None) -> torch.Tensor:
    """Scores s_m [M] in q's dtype. ``key_sums`` [B, M, H_kv, D] stands in for the keys of each
    block under ``score="mean"`` (s_m is linear in the block's key sum); ``"max"`` ignores it.
    Tensor ops only, so it traces under torch.compile: each block's tokens are gathered into a
    row padded to one length, summed in the same order for every block (equal blocks score
    bitwise equal, so ties stay ties)."""
    if q.shape[0] == 0:
        return _scores_without_batch(blocks, score, q.dtype, q.device)
    H, H_kv = q.shape[2], k_pool.shape[2]
    heads_t = torch.tensor(heads, device=q.device)
    kv_t = heads_t // (H // H_kv)
    qs = q[:, ::query_stride][:, :, heads_t]  # [B, S, Hs, D] (stride bounded by the check)
    if score == "mean" and key_sums is not None:
        ksum = shift_blocks(key_sums[:, :, kv_t], deltas, theta, t_theta, kv_t, False).to(q.dtype)
        s = (torch.einsum("bihd,bmhd->bmhi", qs, ksum) * scale).mean(dim=(0, 2, 3))
        return torch.where(_nonempty(blocks, q.device), s, torch.zeros((), dtype=s.dtype,
                                                                       device=s.device))
    P = k_pool.shape[1]
    # One zero token past the pool: where padding points (so empty blocks and an empty pool work).
    ks = torch.cat([k_pool[:, :, kv_t], k_pool.new_zeros(q.shape[0], 1, len(heads), q.shape[3])], 1)
    width = max(1, blocks.max_len if blocks.pairs is not None else P)
    r = blocks.tensor.to(q.device, torch.int64)
    token = r[:, :1] + torch.arange(width, device=q.device)  # [M, width]
    valid = token < r[:, 1:]
    token = torch.where(valid, token, P)
    kb = ks[:, token]  # [B, M, width, Hs, D]: every block's keys, one batched product per block
    kb = shift_blocks(kb, deltas, theta, t_theta, kv_t, True)
    if score == "mean":
        dots = torch.einsum("bihd,bmjhd->mbhij", qs, kb) * scale  # [M, B, Hs, S, width]
        zero = torch.zeros((), dtype=dots.dtype, device=dots.device)
        return torch.where(valid[:, None, None, None], dots, zero).sum(-1).mean(dim=(1, 2, 3))
    qbar = qs.mean(1)  # [B, Hs, D]
    dots = torch.einsum("bhd,bmjhd->mbhj", qbar, kb) * scale  # [M, B, Hs, width]
    ninf = torch.full((), float("-inf"), dtype=dots.dtype, device=dots.device)
    return torch.where(valid[:, None, None], dots, ninf).amax(-1).mean(dim=(1, 2))


def _nonempty(blocks: TokenRanges, device) -> torch.Tensor:
    r = blocks.tensor.to(device)
    return r[:, 1] > r[:, 0]


def _scores_without_batch(blocks: TokenRanges, score, dtype, device) -> torch.Tensor:
    """B = 0: the mean over no (b, h) is NaN, except that an empty block keeps its own rule (0 /
    -inf), as on every backend."""
    empty_score = 0.0 if score == "mean" else float("-inf")
    return torch.where(_nonempty(blocks, device), float("nan"), empty_score).to(dtype)


def topk_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending, on the CPU) of the ``k`` largest ``scores``; equal scores go to
    the smaller index."""
    # A stable descending sort puts the smaller index first among equal scores.
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def select_blocks_eager(q, k_pool, blocks, k, query_stride, heads, score, scale, sums,
                        deltas=None, theta=10000.0, t_theta=None) -> tuple[torch.Tensor, torch.Tensor]:
    s = block_scores_eager(q, k_pool, blocks, query_stride, heads, score, scale, sums, deltas,
                           theta, t_theta)
    return s, topk_ascending(s, k).to(q.device)


def select_blocks_reference(q, k_pool, block_ranges, k, *, query_stride=8, heads=None,
                            score="mean", scale=None, block_key_sums=None, block_deltas=None,
                            theta=10000.0, t_theta=None) -> torch.Tensor:
    """``select_blocks`` computed eagerly (the oracle)."""
    blocks, heads, sums, query_stride = _check_select_blocks(
        q, k_pool, block_ranges, k, query_stride, heads, score, block_key_sums)
    deltas = range_deltas(block_deltas, blocks, k_pool, t_theta, theta, "block_deltas")
    scale = checks.scale_value(scale, q.shape[3])
    return select_blocks_eager(q, k_pool, blocks, k, query_stride, heads, score, scale, sums,
                               deltas, theta, t_theta)[1]


def block_scores_reference(q, k_pool, block_ranges, *, query_stride=8, heads=None, score="mean",
                           scale=None, block_key_sums=None, block_deltas=None, theta=10000.0,
                           t_theta=None) -> torch.Tensor:
    """``block_scores`` computed eagerly (the oracle), in q's dtype."""
    blocks, heads, sums, query_stride = _check_select_blocks(
        q, k_pool, block_ranges, 0, query_stride, heads, score, block_key_sums)
    deltas = range_deltas(block_deltas, blocks, k_pool, t_theta, theta, "block_deltas")
    scale = checks.scale_value(scale, q.shape[3])
    return block_scores_eager(q, k_pool, blocks, query_stride, heads, score, scale, sums, deltas,
                              theta, t_theta)


# ----------------------------------------------------------------------------- kernels


def _native(q, k_pool, blocks, k, query_stride, heads, score, scale, sums, deltas=None,
            theta=10000.0, t_theta=None):
    return torch.ops.vidstream.select_blocks(q, k_pool, blocks.tensor, k, query_stride,
                                             heads, score, scale, sums, deltas, float(theta),
                                             t_theta)


def _triton(q, k_pool, blocks, k, query_stride, heads, score, scale, sums, deltas=None,
            theta=10000.0, t_theta=None):
    from ..triton_kernels import select_blocks as kernels

    return kernels.select_blocks_triton(q, k_pool, blocks.tensor, k, query_stride, heads,
                                        score, scale, sums, deltas, float(theta), t_theta)


@_extension.register_fake("select_blocks")
def _select_blocks_fake(q, k_pool, block_ranges, k, query_stride, heads, score, scale,
                        block_key_sums=None, block_deltas=None, theta=10000.0, t_theta=None):
    M = block_ranges.shape[0]
    return (q.new_empty(M, dtype=torch.float32),
            q.new_empty(min(k, M), dtype=torch.int64))


SELECT_BLOCKS.register("reference", select_blocks_eager)
SELECT_BLOCKS.register("cpu", _native)
SELECT_BLOCKS.register("cuda", _native)
SELECT_BLOCKS.register("triton", _triton)


# ----------------------------------------------------------------------------- torch backend
# ---- torch backend: vectorised PyTorch; float32 scores (float64 for float64 inputs). Each
# block's keys are gathered straight from the pool into one row padded to the longest block (no
# copy of the pool) and reduced along that row: the same reduction for every block, so equal
# blocks score bitwise equal and ties stay ties on every device (an index_add segment sum runs
# on atomics on a GPU, whose order varies).


def _block_rows(blocks: TokenRanges, width: int, device):
    """Pool tokens [M, width] of each block (padding points at a real token, to be masked) and
    which entries are the block's own."""
    r = blocks.tensor.to(device, torch.int64)
    j = torch.arange(width, device=device)
    valid = j[None, :] < (r[:, 1:] - r[:, :1])
    return torch.where(valid, r[:, :1] + j, 0), valid


def _select_blocks_torch(q, k_pool, blocks: TokenRanges, k, query_stride, heads, score, scale,
                         sums, deltas=None, theta=10000.0, t_theta=None):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rope = (deltas, theta, t_theta)
    if blocks.pairs is None:  # traced values: no width on the host, the reference's form
        s = block_scores_eager(q, k_pool, blocks, query_stride, heads, score, scale, sums,
                               *rope).to(acc)
    else:
        s = _block_scores_torch(q, k_pool, blocks, query_stride, heads, score, scale, sums, acc,
                                rope)
    # topk_ascending's rule (a stable descending sort: equal scores keep the smaller index, NaN
    # sorts first) on the scores' device, so picking reads nothing back to the host.
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    return s, torch.sort(order).values


def _block_scores_torch(q, k_pool, blocks, query_stride, heads, score, scale, sums, acc, rope):
    dev = q.device
    if q.shape[0] == 0:
        return _scores_without_batch(blocks, score, acc, dev)
    M, width = len(blocks), blocks.max_len
    H, H_kv = q.shape[2], k_pool.shape[2]
    # The default heads (the first half) are a run: built on the device, no copy from the host.
    run = heads == list(range(heads[0], heads[0] + len(heads)))
    heads_t = torch.arange(heads[0], heads[0] + len(heads), device=dev) if run else torch.tensor(
        heads, device=dev)
    kv_t = heads_t // (H // H_kv)  # the kv head of every scored query head
    qs = q[:, ::query_stride].index_select(2, heads_t)  # [B, S, Hs, D] (stride bounded by the check)
    if score == "mean":
        # sum_i q_i . sum_j k_j: the sampled queries and each block's keys are summed first, in
        # float64 (as the C++ and Triton kernels do): the sums are larger than the score, and
        # float32 would lose what the per-pair products keep (up to ~5x eager's error).
        wide = torch.float64
        if sums is not None:
            ksum = sums.index_select(2, kv_t).to(wide)  # [B, M, Hs, D]
        elif width == 0:
            return torch.zeros(M, dtype=acc, device=dev)
        else:
            tok, valid = _block_rows(blocks, width, dev)
            kb = k_pool[:, tok[:, :, None], kv_t[None, None, :]]  # [B, M, width, Hs, D]
            zero = torch.zeros((), dtype=kb.dtype, device=dev)
            ksum = torch.where(valid[None, :, :, None, None], kb, zero).sum(2, dtype=wide)
        # A block's offset is one rotation of all its keys: it moves their sum the same way.
        ksum = shift_blocks(ksum, *rope, kv_t, False)
        qsum = qs.sum(1, dtype=wide)  # [B, Hs, D]
        count = qs.shape[0] * qs.shape[1] * qs.shape[2]
        s = ((ksum * qsum[:, None]).sum(dim=(0, 2, 3)) * (scale / count)).to(acc)
        # An empty block is an empty sum: 0, even where a sampled query is NaN.
        return torch.where(_nonempty(blocks, dev), s, torch.zeros((), dtype=acc, device=dev))
    if width == 0:
        return torch.full((M,), float("-inf"), dtype=acc, device=dev)
    tok, valid = _block_rows(blocks, width, dev)
    kb = shift_blocks(k_pool[:, tok[:, :, None], kv_t[None, None, :]].to(acc), *rope, kv_t, True)
    qbar = qs.to(acc).mean(1)  # [B, Hs, D]
    dots = torch.einsum("bhd,bmjhd->bmhj", qbar, kb) * scale
    ninf = torch.full((), float("-inf"), dtype=acc, device=dev)
    return torch.where(valid[None, :, None, :], dots, ninf).amax(-1).mean(dim=(0, 2))


SELECT_BLOCKS.register("torch", _select_blocks_torch)


# ----------------------------------------------------------------------------- autograd
# Not differentiable, on every backend (issue #14): select_blocks returns integer indices, which
# have no gradient, and block_scores' scores only rank blocks for that choice: the kernel
# backends return them without a graph (the reference and torch backends' eager scores happen
# to carry one; no gradient of them is part of the contract). Training differentiates the
# attention over the blocks chosen, not the choice. Inputs that require grad are fine: the
# default kernel runs as in inference.
