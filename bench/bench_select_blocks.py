"""Top-k mid-block selection (docs/spec.md §5) at PackForcing's shape: fused kernels against the eager
way (materialised scores), with and without cached per-block key sums, and as a fraction of one
layer's attention over the 27,872-token context.

Shape: 12 heads x 128, 4,680 current + 6,240 recent queries sampled with stride 8 on the first 6
heads, 64 mid blocks of 182 tokens, k = 16.

Attention time: on a GPU, ``vidstream.cached_attention`` with whatever backend it resolves to (the
row says which). On a CPU its reference materialises a 6 GB score matrix, so the stand-in is
torch SDPA of the 4,680 current queries over the gathered 27,872-token context.

    python bench/bench_select_blocks.py --device cpu --json bench/results/

``--headline`` (bench/gpu_check.sh): the same shape, fewer repetitions; ``--tiny``: 4 heads x 32,
20 blocks of 6 tokens, only to check the harness.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import TINY_TIMING, add_size_options, print_table, size_name, time_ms, write_json  # noqa: E402

import vidstream  # noqa: E402
from vidstream import testing  # noqa: E402
from vidstream.ops import select_blocks as selection  # noqa: E402
from vidstream.streaming import compressors as C  # noqa: E402

HEADS, HEAD_DIM = 12, 128
CURRENT, RECENT = 4680, 6240
STRIDE, M, BLOCK, TOPK = 8, 64, 182, 16
CONTEXT = 27872
# --tiny: (heads, head dim, current + recent queries, blocks, block tokens, context, compressed grid)
TINY = dict(heads=4, head_dim=32, queries=128, blocks=20, block=6, context=256, grid=(4, 4, 4))


def eager_mean(q, k_pool, ranges, heads, scale):
    """The eager way: QK^T of every sampled query and every mid key, summed per block."""
    ht = torch.tensor(heads, device=q.device)
    qs = q[:, ::STRIDE][:, :, ht]
    ks = k_pool[:, :, ht // (q.shape[2] // k_pool.shape[2])]
    s = torch.einsum("bihd,bjhd->bhij", qs, ks).float() * scale  # [B, Hs, S, P]
    per_key = s.sum(dim=(0, 1, 2))  # [P]
    seg = torch.repeat_interleave(torch.arange(ranges.shape[0], device=q.device),
                                  (ranges[:, 1] - ranges[:, 0]).to(q.device).long())
    tok = torch.cat([torch.arange(int(a), int(b)) for a, b in ranges.tolist()]).to(q.device)
    scores = torch.zeros(ranges.shape[0], device=q.device).index_add_(0, seg, per_key[tok])
    scores /= s.shape[0] * s.shape[1] * s.shape[2]
    return torch.sort(torch.topk(scores, TOPK).indices).values


def eager_max(q, k_pool, ranges, heads, scale):
    ht = torch.tensor(heads, device=q.device)
    qbar = q[:, ::STRIDE][:, :, ht].float().mean(1)
    ks = k_pool[:, :, ht // (q.shape[2] // k_pool.shape[2])].float()
    s = torch.einsum("bhd,bjhd->bhj", qbar, ks) * scale  # [B, Hs, P]
    seg = torch.repeat_interleave(torch.arange(ranges.shape[0], device=q.device),
                                  (ranges[:, 1] - ranges[:, 0]).to(q.device).long())
    tok = torch.cat([torch.arange(int(a), int(b)) for a, b in ranges.tolist()]).to(q.device)
    mx = torch.full((s.shape[0], s.shape[1], ranges.shape[0]), float("-inf"), device=q.device)
    mx = mx.scatter_reduce(2, seg.expand(s.shape[0], s.shape[1], -1), s[..., tok], "amax")
    return torch.sort(torch.topk(mx.mean(dim=(0, 1)), TOPK).indices).values


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: bfloat16 "
                    "on a GPU, float32 on a CPU)")
    ap.add_argument("--json", default=None, help="write results to this file or folder")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_size_options(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    if args.tiny:
        H, D, Lq, n_blocks, block, context, grid = (TINY[k] for k in (
            "heads", "head_dim", "queries", "blocks", "block", "context", "grid"))
    else:
        H, D, Lq, n_blocks, block, context, grid = (HEADS, HEAD_DIM, CURRENT + RECENT, M, BLOCK,
                                                    CONTEXT, (4, 30, 52))
    timing = TINY_TIMING if args.tiny else dict(reps=10) if args.headline else {}
    few = dict(timing, reps=2) if args.tiny else dict(timing, reps=5)
    q = torch.randn(1, Lq, H, D, device=dev, dtype=dtype)
    k_pool = torch.randn(1, n_blocks * block, H, D, device=dev, dtype=dtype)
    ranges = torch.tensor([[m * block, (m + 1) * block] for m in range(n_blocks)], dtype=torch.int32)
    heads = list(range(H // 2))
    scale = D**-0.5
    sums = selection.block_key_sums(k_pool, ranges)

    fused_backends = ["cpu"] if dev.type == "cpu" else [
        b for b in ("triton", "cuda") if testing.why_not(b, "select_blocks", dev, dtype) is None]
    if args.headline and dev.type == "cuda":
        fused_backends.append("torch")  # the CUDA default until a kernel is validated

    rows = []
    t_eager = time_ms(lambda: eager_mean(q, k_pool, ranges, heads, scale), device=dev, **few)
    rows.append(dict(name="eager mean (QK^T materialised)", backend="torch", ms=t_eager))
    t_eager_max = time_ms(lambda: eager_max(q, k_pool, ranges, heads, scale), device=dev, **few)
    rows.append(dict(name="eager max (qbar K^T)", backend="torch", ms=t_eager_max))
    ref = eager_mean(q, k_pool, ranges, heads, scale)
    for b in fused_backends:
        with vidstream.use_backend(b):
            got = vidstream.select_blocks(q, k_pool, ranges, TOPK, query_stride=STRIDE)
            agree = torch.equal(got.cpu(), ref.cpu())
            for name, kw, base in (
                ("fused mean", {}, t_eager),
                ("fused mean, cached key sums", {"block_key_sums": sums}, t_eager),
                ("fused max", {"score": "max"}, t_eager_max),
            ):
                t = time_ms(lambda kw=kw: vidstream.select_blocks(
                    q, k_pool, ranges, TOPK, query_stride=STRIDE, **kw), device=dev, **timing)
                rows.append(dict(name=name, backend=b, ms=t, speedup_vs_eager=base / t,
                                 same_as_eager=agree if name == "fused mean" else None))

    kb = torch.randn(1, grid[0] * grid[1] * grid[2], H, D, device=dev, dtype=dtype)
    rows.append(dict(name="compress one block (pool, RoPE-aware)", backend="torch",
                     ms=time_ms(lambda: C.compress_block(kb, kb, grid=grid, frame_offset=9.0),
                                device=dev, **few)))

    attn = None
    if not args.skip_attention:
        qa = torch.randn(1, Lq if args.tiny else CURRENT, H, D, device=dev, dtype=dtype)
        kp = torch.randn(1, context, H, D, device=dev, dtype=dtype)
        if dev.type == "cuda":
            rng = torch.tensor([[0, context]], dtype=torch.int32)
            which = "vidstream.cached_attention/" + vidstream.backend_for("cached_attention", qa)
            fn = lambda: vidstream.cached_attention(qa, kp, kp, rng)
        else:
            which = "torch SDPA stand-in (cpu)"
            qt, kt = qa.transpose(1, 2), kp.transpose(1, 2)
            fn = lambda: F.scaled_dot_product_attention(qt, kt, kt)
        attn = time_ms(fn, device=dev, warmup=1, reps=2 if args.tiny else 3, min_time_s=0.0)
        rows.append(dict(name=f"attention, one layer, {context} ctx", backend=which, ms=attn))
        for r in rows:
            if r["name"].startswith(("fused", "eager")):
                r["frac_of_attention"] = r["ms"] / attn

    cols = ["name", "backend", "ms", "speedup_vs_eager", "frac_of_attention", "same_as_eager"]
    print_table(rows, cols, title=f"select_blocks, {dev.type} {dtype}: Lq={Lq} stride {STRIDE}, "
                f"{len(heads)}/{H} heads x {D}, M={n_blocks} x {block}, k={TOPK}")
    write_json(args.json, f"bench_select_{dev.type}", dev, rows, dtype=str(dtype), size=size_name(args))


if __name__ == "__main__":
    main()
