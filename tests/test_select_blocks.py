"""select_blocks (docs/spec.md §5) on every backend against the float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from numerics import DTYPES, assert_close_to_oracle, backend_device_pairs, require, run

import vidstream
from vidstream import reference
from vidstream.ops import select_blocks as selection

# (B, Lq, H, H_kv, D, block sizes (None = empty gap of 3 tokens before the next), k, stride, heads)
CASES = {
    "equal": (1, 40, 4, 4, 16, [12] * 8, 3, 8, None),
    "unequal-gqa": (2, 33, 6, 2, 24, [5, 0, 17, 1, 9, 30], 4, 1, [1, 4, 5]),
    "k>M-one-query": (1, 1, 2, 1, 8, [4, 7, 2], 10, 8, None),
    "wan-headdim": (1, 50, 4, 1, 128, [13] * 10, 5, 8, [3]),
    "stride8-odd": (2, 29, 3, 3, 10, [3, 11, 1, 6], 2, 8, [0, 2]),
}


def _ranges(sizes, shuffle: bool) -> torch.Tensor:
    """Disjoint ranges of the given sizes with gaps between them, listed out of pool order when
    ``shuffle`` (SPEC: ranges come in any order)."""
    out, pos = [], 2
    for n in sizes:
        out.append([pos, pos + n])
        pos += n + 3
    r = torch.tensor(out, dtype=torch.int32).reshape(-1, 2)
    if shuffle and len(out) > 1:
        r = r[torch.randperm(len(out))]
    return r


def _make(case, dtype, device="cpu", shuffle=True):
    B, Lq, H, H_kv, D, sizes, k, stride, heads = CASES[case]
    r = _ranges(sizes, shuffle)
    P = int(r[:, 1].max()) + 5
    q = torch.randn(B, Lq, H, D, device=device).to(dtype)
    kp = torch.randn(B, P, H_kv, D, device=device).to(dtype)
    return q, kp, r, k, stride, heads


def _oracle(q, kp, r, stride, heads, score, sums=None):
    heads = heads if heads is not None else list(range(max(1, q.shape[2] // 2)))
    scale = q.shape[3] ** -0.5
    kw = dict(query_stride=stride, heads=heads, score=score, scale=scale)
    oracle = reference.block_scores(q.double(), kp.double(), r, **kw)
    eager = reference.block_scores(q, kp, r, **kw, block_key_sums=sums)
    return oracle, eager


def _finite_close(out, oracle, eager, what):
    """Empty blocks score -inf under "max": those must match exactly; the rest by the rule."""
    inf = torch.isinf(oracle)
    assert torch.equal(torch.isinf(out.cpu()), inf.cpu()), f"{what}: -inf entries differ"
    assert_close_to_oracle(out[~inf].float(), oracle[~inf], eager[~inf].float(), what=what)


def _check_indices(idx, scores, oracle, k, what):
    M = oracle.shape[0]
    assert idx.dtype == torch.int64 and idx.shape == (min(k, M),), what
    assert torch.equal(idx.cpu(), reference.topk_ascending(scores.float().cpu(), k)), (
        f"{what}: indices are not the top-k of the kernel's own scores")
    if 0 < k < M:
        # Where float64 separates the k-th and (k+1)-th score clearly, rounding cannot flip them.
        srt = torch.sort(oracle, descending=True).values
        spread = float(oracle[torch.isfinite(oracle)].abs().max()) if torch.isfinite(oracle).any() else 1
        if float(srt[k - 1] - srt[k]) > 1e-2 * spread:
            assert torch.equal(idx.cpu(), reference.topk_ascending(oracle, k)), what


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("score", ["mean", "max"])
def test_matches_reference(backend, device, dtype, case, score):
    require(backend, "select_blocks", device, dtype)
    if backend == "triton" and device == "cpu" and (case == "wan-headdim" or dtype != torch.float32):
        pytest.skip("the Triton interpreter is slow: one dtype and the small shapes")
    q, kp, r, k, stride, heads = _make(case, dtype, device)
    oracle, eager = _oracle(q, kp, r, stride, heads, score)
    kw = dict(query_stride=stride, heads=heads, score=score)
    scores = run(backend, selection.block_scores, q, kp, r, **kw)
    idx = run(backend, vidstream.select_blocks, q, kp, r, k, **kw)
    assert scores.dtype == torch.float32 and scores.device == q.device
    assert idx.device == q.device
    what = f"{backend} {case} {score} {dtype}"
    _finite_close(scores, oracle, eager, what)
    _check_indices(idx, scores, oracle, k, what)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("case", ["equal", "unequal-gqa", "k>M-one-query"])
def test_block_key_sums_path(backend, device, case):
    """Cached per-block key sums give the scores and indices of the plain path ("mean"); "max"
    ignores them."""
    dtype = torch.float32
    require(backend, "select_blocks", device, dtype)
    q, kp, r, k, stride, heads = _make(case, dtype, device)
    sums = selection.block_key_sums(kp, r)
    assert sums.dtype == torch.float32 and sums.shape == (q.shape[0], r.shape[0], kp.shape[2], q.shape[3])
    oracle, eager = _oracle(q, kp, r, stride, heads, "mean", sums)
    kw = dict(query_stride=stride, heads=heads)
    plain = run(backend, vidstream.select_blocks, q, kp, r, k, **kw)
    cached_scores = run(backend, selection.block_scores, q, kp, r, block_key_sums=sums, **kw)
    cached = run(backend, vidstream.select_blocks, q, kp, r, k, block_key_sums=sums, **kw)
    _finite_close(cached_scores, oracle, eager, f"{backend} {case} cached sums")
    _check_indices(cached, cached_scores, oracle, k, f"{backend} {case} cached sums")
    srt = torch.sort(oracle, descending=True).values
    if not 0 < k < r.shape[0] or float(srt[k - 1] - srt[k]) > 1e-3 * float(oracle.abs().max()):
        assert torch.equal(cached, plain)
    if q.shape[0] == 1:  # the [M, H_kv, D] form
        assert torch.equal(run(backend, vidstream.select_blocks, q, kp, r, k, block_key_sums=sums[0],
                               **kw), cached)
    mx = run(backend, vidstream.select_blocks, q, kp, r, k, score="max", block_key_sums=sums, **kw)
    assert torch.equal(mx, run(backend, vidstream.select_blocks, q, kp, r, k, score="max", **kw))


def test_block_key_sums_helper():
    kp = torch.randn(2, 40, 3, 8, dtype=torch.float64)
    r = torch.tensor([[30, 40], [0, 0], [3, 9]], dtype=torch.int32)
    s = selection.block_key_sums(kp, r)
    want = torch.stack([kp[:, 30:40].sum(1), torch.zeros(2, 3, 8, dtype=torch.float64),
                        kp[:, 3:9].sum(1)], dim=1)
    torch.testing.assert_close(s, want)


def _tie_inputs(device, dtype, H=4, D=16, n=6, Lq=24):
    """Blocks [A, B, A, C, B, A] with A = base + delta, C = base - delta, delta along each head's
    mean sampled query: for both scores A > B > C, and equal contents give exactly equal scores."""
    q = torch.randn(1, Lq, H, D)
    base = torch.randn(1, n, H, D)
    qbar = q[:, ::8].mean(1)  # [1, H, D]
    delta = (3 * qbar / qbar.norm(dim=-1, keepdim=True))[:, None]
    blocks = {"A": base + delta, "B": base, "C": base - delta}
    layout = "ABACBA"
    kp = torch.cat([blocks[c] for c in layout], dim=1)
    r = torch.tensor([[i * n, (i + 1) * n] for i in range(len(layout))], dtype=torch.int32)
    return q.to(device, dtype), kp.to(device, dtype), r


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")]
                         + backend_device_pairs())
@pytest.mark.parametrize("score", ["mean", "max"])
def test_ties_go_to_smaller_index(backend, device, score):
    dtype = torch.float32
    require(backend, "select_blocks", device, dtype)
    q, kp, r = _tie_inputs(device, dtype)
    heads = list(range(4))
    expect = {1: [0], 2: [0, 2], 3: [0, 2, 5], 4: [0, 1, 2, 5], 5: [0, 1, 2, 4, 5],
              6: [0, 1, 2, 3, 4, 5], 9: [0, 1, 2, 3, 4, 5]}
    for k, want in expect.items():
        got = run(backend, vidstream.select_blocks, q, kp, r, k, heads=heads, score=score)
        assert got.tolist() == want, f"k={k}: {got.tolist()} != {want}"
    # All-zero keys and empty blocks: every "mean" score is exactly 0.
    zero = torch.zeros_like(kp)
    r2 = torch.cat([r, torch.tensor([[0, 0], [36, 36]], dtype=torch.int32)])
    got = run(backend, vidstream.select_blocks, q, zero, r2, 5, heads=heads, score="mean")
    assert got.tolist() == [0, 1, 2, 3, 4]


def test_default_heads_and_scale():
    q, kp, r, *_ = _make("equal", torch.float64)
    a = reference.select_blocks(q, kp, r, 3)
    b = reference.select_blocks(q, kp, r, 3, heads=[0, 1], scale=16**-0.5)
    assert torch.equal(a, b)
    s_half = reference.block_scores(q, kp, r, heads=[0, 1], scale=0.5)
    s_one = reference.block_scores(q, kp, r, heads=[0, 1], scale=1.0)
    torch.testing.assert_close(2 * s_half, s_one)


BAD = [
    (dict(score="sum"), "score"),
    (dict(heads=[0, 9]), "heads"),
    (dict(heads=[1, 1]), "heads"),
    (dict(heads=[]), "heads"),
    (dict(query_stride=0), "query_stride"),
    (dict(k=-1), "k must"),
    (dict(block_ranges=[[0, 10], [5, 12]]), "overlap"),
    (dict(block_ranges=[[0, 500]]), "block_ranges"),
    (dict(block_key_sums=torch.zeros(3, 2, 8)), "block_key_sums"),
    (dict(q=torch.randn(1, 8, 3, 8)), "heads"),
    (dict(k_pool=torch.randn(1, 30, 2, 8, dtype=torch.float64)), "dtype"),
    (dict(k_pool=torch.randn(1, 30, 2, 6)), "head dim"),
    (dict(q=torch.randn(1, 0, 4, 8)), "Lq"),
]


@pytest.mark.parametrize("bad,match", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_raise(bad, match):
    args = dict(q=torch.randn(1, 8, 4, 8), k_pool=torch.randn(1, 30, 2, 8),
                block_ranges=[[0, 10], [10, 12]], k=1)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        vidstream.select_blocks(args.pop("q"), args.pop("k_pool"), args.pop("block_ranges"),
                                args.pop("k"), **args)


def _op_args(B=1, Lq=20, H=4, H_kv=2, D=8, M=4, k=2, sums=False, device="cpu"):
    q = torch.randn(B, Lq, H, D, device=device)
    kp = torch.randn(B, 5 * M + 3, H_kv, D, device=device)
    r = torch.tensor([[5 * m, 5 * m + 4] for m in range(M)], dtype=torch.int32)
    s = selection.block_key_sums(kp, r) if sums else None
    return (q, kp, r, k, 3, sorted({0, H - 1}), "mean", 0.3, s)


def test_cpp_op_rejects_bad_inputs():
    require("cpu", "select_blocks", "cpu", torch.float32)
    op = torch.ops.vidstream.select_blocks
    q, kp, r, k, stride, heads, score, scale, _ = _op_args()
    # Refused by the public op only: none of these takes the kernel outside its tensors.
    overlap = torch.tensor([[0, 9], [8, 12]], dtype=torch.int32)
    for kw, match in [(dict(score="sum"), "score"), (dict(heads=[2, 2]), "distinct"),
                      (dict(block_ranges=overlap), "overlap")]:
        a = {**dict(block_ranges=r, query_stride=stride, heads=heads, score=score, scale=scale), **kw}
        with pytest.raises(ValueError, match=match):
            vidstream.select_blocks(q, kp, a.pop("block_ranges"), k, **a)
    cases = [
        ((q, kp, r, k, stride, [0, 7], score, scale, None), "heads"),
        ((q, kp, r, k, 0, heads, score, scale, None), "query_stride"),
        ((q, kp, r, -2, stride, heads, score, scale, None), "k must"),
        ((q, kp, r.long(), k, stride, heads, score, scale, None), "int32"),
        ((q, kp, torch.tensor([[0, 99]], dtype=torch.int32), k, stride, heads, score, scale, None),
         "block_ranges"),
        ((q, kp.double(), r, k, stride, heads, score, scale, None), "k_pool"),
        ((q, kp[:, :, :, :6], r, k, stride, heads, score, scale, None), "head dim"),
        ((q, kp, r, k, stride, heads, score, scale, torch.zeros(1, 4, 2, 7)), "block_key_sums"),
        ((q[:, :, :3], kp, r, k, stride, [0], score, scale, None), "multiple"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("sums", [False, True])
@pytest.mark.parametrize("score", ["mean", "max"])
def test_opcheck(device, sums, score):
    require(device, "select_blocks", device, torch.float32)
    args = list(_op_args(sums=sums, device=device))
    args[6] = score
    args[2] = args[2].to(device)  # the C++ ops take ranges on the device of q
    torch.library.opcheck(torch.ops.vidstream.select_blocks.default, tuple(args))
    args = list(_op_args(B=2, Lq=9, H=2, H_kv=1, M=7, k=9, sums=sums, device=device))
    args[2] = args[2].to(device)
    torch.library.opcheck(torch.ops.vidstream.select_blocks.default, tuple(args))


def test_opcheck_triton_schema_and_fake():
    require("triton", "select_blocks", "cpu", torch.float32)
    from vidstream.triton_kernels import select_blocks as kernels  # noqa: F401

    q, kp, r, k, stride, heads, score, scale, s = _op_args(sums=True)
    torch.library.opcheck(torch.ops.vidstream.select_blocks_triton.default,
                          (q, kp, r, k, stride, heads, score, scale, s),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_cpu():
    require("cpu", "select_blocks", "cpu", torch.float32)
    q, kp, r, *_ = _op_args(M=6)
    sums = selection.block_key_sums(kp, r)

    def pick(q, kp, r, sums):
        return (vidstream.select_blocks(q, kp, r, 3, query_stride=3, heads=[0, 3]),
                vidstream.select_blocks(q, kp, r, 3, query_stride=3, heads=[0, 3], score="max"),
                vidstream.select_blocks(q, kp, r, 3, query_stride=3, heads=[0, 3],
                                        block_key_sums=sums))

    torch._dynamo.reset()
    compiled = torch.compile(pick, fullgraph=True, backend="aot_eager")
    got = compiled(q, kp, r, sums)
    want = pick(q, kp, r, sums)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("score", ["mean", "max"])
def test_strided_views(backend, device, score):
    """q and k_pool as views into larger buffers (the cache hands out slices of its pool)."""
    require(backend, "select_blocks", device, torch.float32)
    q = torch.randn(1, 30, 8, 16, device=device)[:, :, ::2]  # head stride 32
    kp = torch.randn(1, 90, 6, 16, device=device)[:, 5:85, 1:4:2]  # [1, 80, 2, 16]
    r = _ranges([7, 9, 4, 12, 5], shuffle=True)
    oracle, eager = _oracle(q, kp, r, 3, [0, 1, 3], score)
    kw = dict(query_stride=3, heads=[0, 1, 3], score=score)
    scores = run(backend, selection.block_scores, q, kp, r, **kw)
    _finite_close(scores, oracle, eager, f"{backend} strided {score}")
    idx = run(backend, vidstream.select_blocks, q, kp, r, 2, **kw)
    _check_indices(idx, scores, oracle, 2, f"{backend} strided {score}")


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")]
                         + backend_device_pairs())
def test_no_blocks_and_k_zero(backend, device):
    require(backend, "select_blocks", device, torch.float32)
    q = torch.randn(1, 9, 2, 8, device=device)
    kp = torch.randn(1, 12, 1, 8, device=device)
    none = torch.zeros(0, 2, dtype=torch.int32)
    got = run(backend, vidstream.select_blocks, q, kp, none, 4)
    assert got.shape == (0,) and got.dtype == torch.int64
    r = torch.tensor([[0, 5], [5, 12]], dtype=torch.int32)
    assert run(backend, vidstream.select_blocks, q, kp, r, 0).shape == (0,)
    s = run(backend, selection.block_scores, q, kp, none)
    assert s.shape == (0,)


_EVERY_BACKEND = [pytest.param("reference", "cpu", id="reference-cpu"),
                  pytest.param("torch", "cpu", id="torch-cpu")] + backend_device_pairs()


@pytest.mark.parametrize("backend,device", _EVERY_BACKEND)
@pytest.mark.parametrize("sums", [False, True], ids=["keys", "key-sums"])
def test_empty_block_and_empty_batch(backend, device, sums):
    """An empty block scores 0 ("mean") / -inf ("max") even where a sampled query is NaN; with
    batch 0 every other block scores NaN (a mean over nothing); the same on every backend."""
    require(backend, "select_blocks", device, torch.float32)
    r = torch.tensor([[0, 5], [5, 5], [8, 20], [9, 9]], dtype=torch.int32)
    empty = torch.tensor([False, True, False, True])
    for B in (1, 0):
        q = torch.randn(B, 4, 2, 8, device=device)
        q[:, 0, 0, 0] = float("nan")
        kp = torch.randn(B, 20, 1, 8, device=device)
        for score, empty_score in (("mean", 0.0), ("max", float("-inf"))):
            kw = dict(query_stride=1, heads=[0], score=score)
            if sums:
                kw["block_key_sums"] = selection.block_key_sums(kp, r)
            s = run(backend, selection.block_scores, q, kp, r, **kw).cpu()
            assert (s[empty] == empty_score).all(), (B, score, s)
            assert s[~empty].isnan().all(), (B, score, s)  # the NaN query (B=1), no terms (B=0)
            idx = run(backend, vidstream.select_blocks, q, kp, r, 3, **kw).cpu()
            assert idx.tolist() == [0, 1, 2], (B, score, idx)  # NaN ranks first, ties by index


_AOT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vidstream.triton_kernels.select_blocks as K

def sig(fn, types, consts):
    return {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}

tgt = GPUTarget("cuda", int(sys.argv[1]), 32)
t1 = dict(q_ptr="*bf16", heads_ptr="*i32", qred_ptr="*fp64", counter_ptr="*i32", inv="fp32")
c1 = dict(D=128, BLOCK_D=128, BLOCK_S=32)
triton.compile(ASTSource(K._reduce_queries_kernel, sig(K._reduce_queries_kernel, t1, c1), c1), target=tgt)
t2 = dict(k_ptr="*bf16", ranges_ptr="*i32", qred_ptr="*fp64", heads_ptr="*i32", sums_ptr="*fp32",
          scores_ptr="*fp32", idx_ptr="*i64", counter_ptr="*i32", scale="fp32", norm="fp32")
for mean, sums in ((True, False), (True, True), (False, False)):
    c2 = dict(D=128, BLOCK_D=128, BLOCK_J=32, MEAN=mean, HAS_SUMS=sums, TILE=64)
    out = triton.compile(ASTSource(K._block_scores_kernel, sig(K._block_scores_kernel, t2, c2), c2),
                         target=tgt)
    assert "cubin" in out.asm
print("ok")
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch, tmp_path):
    """No GPU here: compile the Triton kernels ahead of time for sm_80 / sm_90 (bfloat16, every
    score variant) so GPU-only lowering errors show up on a CPU machine."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _AOT, str(arch)], env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas for ahead-of-time compilation")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ----------------------------------------------------------------------------- block_deltas

# Not the Triton interpreter: too slow for this grid (the Triton kernel's offsets have tests of
# their own).
_DELTA_BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu")] + [
    p for p in backend_device_pairs() if tuple(p.values) != ("triton", "cpu")]
# case -> whether the keys carry a per-kv-head t_theta
_DELTA_CASES = {"unequal-gqa": True, "wan-headdim": False, "stride8-odd": True}


def _deltas_for(M):
    """One offset per block: zero, negative, fractional, large."""
    d = (torch.randn(M, dtype=torch.float64) * 6).round(decimals=2)
    d[0] = 0.0
    d[-1] = 1e3 + 0.25
    return d.tolist()




@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend,device", _DELTA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(_DELTA_CASES))
@pytest.mark.parametrize("score,sums", [("mean", False), ("mean", True), ("max", False)],
                         ids=["mean-keys", "mean-key-sums", "max"])
def test_block_deltas(backend, device, dtype, case, score, sums):
    """Blocks scored as if their keys were rope3d_shift_-ed by block_deltas, against the float64
    reference (which shifts every key); GQA, empty blocks, per-head t_theta."""
    require(backend, "select_blocks", device, dtype)
    q, kp, r, k, stride, heads = _make(case, dtype, device)
    M, H_kv = r.shape[0], kp.shape[2]
    t_theta = torch.linspace(8000.0, 12000.0, H_kv, device=device) if _DELTA_CASES[case] else None
    rope = dict(block_deltas=_deltas_for(M), t_theta=t_theta)
    key_sums = selection.block_key_sums(kp, r) if sums else None
    kw = dict(query_stride=stride, heads=heads, score=score, scale=q.shape[3] ** -0.5, **rope)
    oracle = reference.block_scores(q.double(), kp.double(), r, **kw)
    eager = reference.block_scores(q, kp, r, **kw, block_key_sums=key_sums)
    scores = run(backend, selection.block_scores, q, kp, r, **kw, block_key_sums=key_sums)
    idx = run(backend, vidstream.select_blocks, q, kp, r, k, **kw,
                      block_key_sums=key_sums)
    assert scores.dtype == torch.float32 and scores.device == q.device
    what = f"{backend} {case} {score} sums={sums} {dtype}"
    _finite_close(scores, oracle, eager, what)
    _check_indices(idx, scores, oracle, k, what)
    # The offsets matter: the float64 scores move.
    still = reference.block_scores(q.double(), kp.double(), r, **{**kw, "block_deltas": None})
    assert not torch.allclose(still, oracle)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend,device", _DELTA_BACKENDS)
@pytest.mark.parametrize("score", ["mean", "max"])
def test_block_deltas_nan_and_empty(backend, device, score):
    """With offsets as without: a NaN key makes its own block's score NaN and no other; empty
    blocks score 0 ("mean") / -inf ("max"); keys outside the blocks are never read."""
    require(backend, "select_blocks", device, torch.float32)
    q = torch.randn(1, 12, 4, 16, device=device)
    kp = torch.randn(1, 40, 2, 16, device=device)
    r = torch.tensor([[20, 31], [5, 5], [0, 9], [31, 31], [33, 40]], dtype=torch.int32)
    kp[:, 10:20] = float("nan")  # between blocks
    kp[0, 35, 1, 2] = float("nan")  # block 4, kv head 1, a temporal channel
    kw = dict(query_stride=2, heads=[0, 3], score=score, block_deltas=[2.5, -1.0, 0.5, 7.0, -3.25],
              t_theta=torch.tensor([9000.0, 11000.0], device=device))
    s = run(backend, selection.block_scores, q, kp, r, **kw).cpu()
    oracle = reference.block_scores(q.double(), kp.double(), r, **kw)
    empty = 0.0 if score == "mean" else float("-inf")
    assert s[1] == empty and s[3] == empty
    assert torch.isnan(s[4]) and torch.isfinite(s[[0, 2]]).all()
    assert torch.equal(torch.isnan(s), torch.isnan(oracle))


@pytest.mark.usefixtures("one_thread")
def test_block_deltas_op_checks():
    """The C++ op checks what its kernel indexes by: one float64 host offset per block, t_theta
    per kv head."""
    if not vidstream._extension.load():
        pytest.skip("vidstream._C not built")
    q, kp = torch.randn(1, 8, 4, 16), torch.randn(1, 20, 2, 16)
    r = torch.tensor([[0, 5], [8, 12], [12, 12]], dtype=torch.int32)
    op = torch.ops.vidstream.select_blocks
    good = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    op(q, kp, r, 2, 1, [0, 1], "max", 0.25, None, good, 10000.0, None)
    with pytest.raises(RuntimeError, match=r"block_deltas must have shape \[R\]"):
        op(q, kp, r, 2, 1, [0, 1], "max", 0.25, None, good[:2], 10000.0, None)
    with pytest.raises(RuntimeError, match="block_deltas must be float64"):
        op(q, kp, r, 2, 1, [0, 1], "mean", 0.25, None, good.float(), 10000.0, None)
    with pytest.raises(RuntimeError, match="t_theta must have shape"):
        op(q, kp, r, 2, 1, [0, 1], "mean", 0.25, None, good, 10000.0, torch.ones(4))
