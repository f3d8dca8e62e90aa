"""chunk_attention (docs/spec.md §1) and cached_attention (§2) on every kernel backend against the
float64 reference, plus the property that ties them: generating chunk by chunk with
cached_attention over a sink + ring-buffer window equals chunk_attention on the whole sequence."""

from __future__ import annotations

import itertools

import pytest
import torch
from numerics import DTYPES, assert_close_to_oracle, backend_device_pairs, require, run

import vidstream
from vidstream import reference

PAIRS = backend_device_pairs()


def _dt(backend):
    """The dtype a grid test runs in: float32, except on the cuda backend (tensor cores: the
    float16/bfloat16 kernels serve it; float32 is refused there)."""
    return torch.bfloat16 if backend == "cuda" else torch.float32


def _serves(backend, D, Dv, dtype):
    if backend == "cuda" and (D not in (64, 128) or Dv != D or dtype == torch.float32):
        pytest.skip("the cuda kernel serves float16/bfloat16 with D == Dv in (64, 128)")


def _qkv(B, Lq, Lk, H, H_kv, D, Dv, dtype, device):
    q = torch.randn(B, Lq, H, D, device=device).to(dtype)
    k = torch.randn(B, Lk, H_kv, D, device=device).to(dtype)
    v = torch.randn(B, Lk, H_kv, Dv, device=device).to(dtype)
    return q, k, v


def _check(backend, fn, ref_fn, args, kwargs, what):
    """Kernel vs float64 oracle vs eager reference in the same dtype, for out and lse."""
    out, lse = run(backend, fn, *args, **kwargs, return_lse=True)
    oracle_out, oracle_lse = ref_fn(*[a.double() if torch.is_tensor(a) and a.is_floating_point()
                                      else a for a in args], **kwargs, return_lse=True)
    eager_out, eager_lse = ref_fn(*args, **kwargs, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == oracle_lse.shape
    assert_close_to_oracle(out, oracle_out.to(out.device), eager_out, what=f"{what} out")
    finite = torch.isfinite(oracle_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu()), f"{what}: lse finiteness"
    assert_close_to_oracle(lse[finite], oracle_lse[finite].to(lse.device), eager_lse[finite],
                           what=f"{what} lse")
    return out, lse


# ----------------------------------------------------------------------------- §1 grid

# (chunk_frames, sink_frames, window_frames as a multiple of the chunk or None), each paired with
# one of the frame sizes 1, 7, 40, 130 so every frame size meets several masks.
_MASKS = [(cf, sink, win) for cf in (1, 3) for sink in (0, 1, 3) for win in (None, 1, 3)]
_FRAME_TOKENS = (1, 7, 40, 130)
_GRID = [pytest.param(cf, sink, None if w is None else w * cf, _FRAME_TOKENS[n % 4],
                      id=f"cf{cf}-sink{sink}-win{'none' if w is None else w * cf}-ft{_FRAME_TOKENS[n % 4]}")
         for n, (cf, sink, w) in enumerate(_MASKS)]
# Windows that are not a whole number of chunks: the window start falls inside a chunk.
_GRID += [pytest.param(cf, sink, win, ft, id=f"cf{cf}-sink{sink}-win{win}-ft{ft}")
          for cf, sink, win, ft in ((3, 1, 4, 7), (2, 0, 3, 40), (3, 0, 5, 1), (3, 2, 7, 130))]


def _frames_for(ft, cf, light):
    # Enough frames for several chunks (so windows slide past the sink), few tokens in all; with
    # one token per frame, enough rows that the max error is not decided by a handful of values.
    if ft == 1:
        return cf * (8 if light else 12) + 2
    if ft >= 130:
        return cf * (2 if light else 3) + (cf > 1)
    if ft >= 40:
        return cf * (3 if light else 4) + 1
    return cf * 5 + 2 if not light else cf * 3 + 1


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("cf,sink,window,ft", _GRID)
def test_chunk_attention_masks(backend, device, cf, sink, window, ft):
    require(backend, "chunk_attention", device, _dt(backend))
    light = backend != "cpu"  # the Triton interpreter is slow: fewer frames
    F = _frames_for(ft, cf, light)
    q, k, v = _qkv(1, F * ft, F * ft, 2, 1, 64, 64, _dt(backend), device)
    kw = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=sink, window_frames=window)
    _check(backend, vidstream.chunk_attention, reference.chunk_attention, (q, k, v), kw,
           f"{backend} F={F} ft={ft} cf={cf} sink={sink} win={window}")


_SHAPES = [  # (B, H, H_kv, D, Dv): GQA, MQA, MHA; head dims 64 and 128
    (1, 4, 2, 64, 64),
    (2, 3, 1, 128, 128),
    (1, 2, 2, 128, 64),
]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "B{}-H{}-Hkv{}-D{}-Dv{}".format(*s))
def test_chunk_attention_dtypes_heads(backend, device, dtype, shape):
    require(backend, "chunk_attention", device, dtype)
    B, H, H_kv, D, Dv = shape
    _serves(backend, D, Dv, dtype)
    ft, cf = 7, 3
    F = 8
    q, k, v = _qkv(B, F * ft, F * ft, H, H_kv, D, Dv, dtype, device)
    kw = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=1, window_frames=6)
    _check(backend, vidstream.chunk_attention, reference.chunk_attention, (q, k, v), kw,
           f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_chunk_attention_scale_and_strides(backend, device):
    require(backend, "chunk_attention", device, _dt(backend))
    ft, F = 5, 7
    qkv = torch.randn(2, F * ft, 3, 4, 64, device=device).to(_dt(backend))  # fused projection, sliced
    q, k, v = qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, :2]
    kw = dict(frame_tokens=ft, chunk_frames=2, sink_frames=1, window_frames=4, scale=0.3)
    _check(backend, vidstream.chunk_attention, reference.chunk_attention, (q, k, v), kw,
           f"{backend} strided")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_chunk_attention_one_token(backend, device):
    require(backend, "chunk_attention", device, _dt(backend))
    q, k, v = _qkv(1, 1, 1, 2, 2, 64, 64, _dt(backend), device)
    out = run(backend, vidstream.chunk_attention, q, k, v, frame_tokens=1, chunk_frames=1)
    torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)  # one key: its value, exactly


def test_chunk_attention_bad_inputs():
    q, k, v = _qkv(1, 12, 12, 2, 2, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="window_frames"):
        vidstream.chunk_attention(q, k, v, frame_tokens=4, chunk_frames=2, window_frames=1)
    with pytest.raises(ValueError, match="frame_tokens"):
        vidstream.chunk_attention(q, k, v, frame_tokens=5, chunk_frames=1)
    with pytest.raises(ValueError, match="heads"):
        vidstream.chunk_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1),
                                  frame_tokens=4, chunk_frames=1)
    with pytest.raises(ValueError, match="dtype"):
        vidstream.chunk_attention(q, k.half(), v, frame_tokens=4, chunk_frames=1)


def test_chunk_attention_op_checks_its_inputs():
    if not vidstream._extension.load():
        pytest.skip("vidstream._C not built")
    q, k, v = _qkv(1, 12, 12, 2, 2, 16, 16, torch.float32, "cpu")
    op = torch.ops.vidstream.chunk_attention
    # Mask parameters that index nothing out of bounds: only the public op refuses them.
    with pytest.raises(ValueError, match="window_frames"):
        vidstream.chunk_attention(q, k, v, frame_tokens=4, chunk_frames=2, window_frames=1)
    with pytest.raises(RuntimeError, match="chunk_frames"):
        op(q, k, v, 4, 0, 0, None, 0.25)
    with pytest.raises(ValueError, match="frame_tokens"):
        vidstream.chunk_attention(q, k, v, frame_tokens=5, chunk_frames=1)
    with pytest.raises(RuntimeError, match="k must have the tokens"):
        op(q, k[:, :8], v[:, :8], 4, 1, 0, None, 0.25)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(q.double(), k.double(), v.double(), 4, 1, 0, None, 0.25)


# ----------------------------------------------------------------------------- §2


_RANGE_CASES = {
    # name: (pool tokens, ranges)
    "in-order": (90, [[0, 21], [40, 90]]),
    "any-order-wrapped": (130, [[100, 130], [0, 17], [50, 51], [60, 60]]),  # ring wrap + one token
    "one-token": (40, [[13, 14]]),
    "whole-pool": (75, [[0, 75]]),
    "many-small": (64, [[i, i + 3] for i in range(0, 60, 5)]),
}


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("case", list(_RANGE_CASES))
@pytest.mark.parametrize("Lq", [1, 21, 70])
def test_cached_attention_ranges(backend, device, case, Lq):
    require(backend, "cached_attention", device, _dt(backend))
    P, ranges = _RANGE_CASES[case]
    q, k, v = _qkv(2, Lq, P, 4, 2, 64, 64, _dt(backend), device)
    kr = torch.tensor(ranges, dtype=torch.int32)
    _check(backend, vidstream.cached_attention, reference.cached_attention, (q, k, v, kr), {},
           f"{backend} {case} Lq={Lq}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "B{}-H{}-Hkv{}-D{}-Dv{}".format(*s))
def test_cached_attention_dtypes_heads(backend, device, dtype, shape):
    require(backend, "cached_attention", device, dtype)
    B, H, H_kv, D, Dv = shape
    _serves(backend, D, Dv, dtype)
    q, k, v = _qkv(B, 37, 150, H, H_kv, D, Dv, dtype, device)
    kr = torch.tensor([[120, 150], [0, 9], [30, 101]], dtype=torch.int32)
    _check(backend, vidstream.cached_attention, reference.cached_attention, (q, k, v, kr),
           dict(scale=0.11), f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("ranges", [[], [[5, 5]], [[0, 0], [9, 9]]], ids=["none", "empty", "two-empty"])
def test_cached_attention_empty_union(backend, device, ranges):
    require(backend, "cached_attention", device, _dt(backend))
    q, k, v = _qkv(1, 9, 20, 2, 1, 64, 64, _dt(backend), device)
    kr = torch.tensor(ranges, dtype=torch.int32).reshape(-1, 2)
    out, lse = run(backend, vidstream.cached_attention, q, k, v, kr, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


def test_cached_attention_bad_ranges():
    q, k, v = _qkv(1, 4, 20, 2, 1, 16, 16, torch.float32, "cpu")
    for bad, msg in [([[0, 10], [5, 12]], "overlap"), ([[15, 21]], "<= 20"), ([[-1, 3]], "0 <= start"),
                     ([[6, 3]], "start <= end")]:
        with pytest.raises(ValueError, match=msg):
            vidstream.cached_attention(q, k, v, torch.tensor(bad, dtype=torch.int32))
        # The C++ op checks bounds again (it can be called directly); overlap is no
        # memory-safety matter there.
        if vidstream._extension.load() and msg != "overlap":
            with pytest.raises(RuntimeError, match=msg):
                torch.ops.vidstream.cached_attention(q, k, v, torch.tensor(bad, dtype=torch.int32), 0.25)


# ----------------------------------------------------------------------------- the property


def _ring_layout(sink, window, ft, cf, F):
    """Pool slots of a sink + ring-buffer window cache: for chunk c, where each frame's keys
    live and which ranges chunk c's queries read (the sink, then the window, possibly wrapped)."""
    ring = window  # the window is counted back from the chunk end, independent of the sink

    def slot(f):
        return f if f < sink else sink + (f - sink) % ring

    plans = []
    for c in range((F + cf - 1) // cf):
        end = min((c + 1) * cf, F)
        frames = sorted(set(range(min(sink, end))) | set(range(max(0, (c + 1) * cf - window), end)))
        slots = sorted(slot(f) for f in frames)
        ranges = []
        for s in slots:
            if ranges and ranges[-1][1] == s * ft:
                ranges[-1][1] = (s + 1) * ft
            else:
                ranges.append([s * ft, (s + 1) * ft])
        plans.append((c * cf, end, ranges))
    return slot, plans, sink + ring


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("cf,sink,window,ft", [(3, 1, 6, 7), (1, 2, 3, 5), (2, 0, 4, 9), (3, 3, 9, 4)])
def test_streaming_equals_full_sequence(backend, device, cf, sink, window, ft):
    require(backend, "cached_attention", device, _dt(backend))
    F = 4 * cf + 1
    q, k, v = _qkv(1, F * ft, F * ft, 4, 2, 64, 64, _dt(backend), device)
    kw = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=sink, window_frames=window)
    full = run(backend, vidstream.chunk_attention, q, k, v, **kw)
    oracle = reference.chunk_attention(q.double(), k.double(), v.double(), **kw)
    eager = reference.chunk_attention(q, k, v, **kw)
    slot, plans, pool_frames = _ring_layout(sink, window, ft, cf, F)
    # The window is `window` consecutive frames, so they sit in distinct ring slots; a slot is
    # overwritten only once its frame has left every later window. NaN marks unwritten slots.
    k_pool = torch.full((1, pool_frames * ft, 2, 64), float("nan"), device=device, dtype=q.dtype)
    v_pool = torch.full_like(k_pool, float("nan"))
    streamed = torch.full_like(full, float("nan"))
    for f0, f1, ranges in plans:
        for f in range(f0, f1):  # the chunk writes its own keys into the cache, then attends
            s = slot(f)
            k_pool[:, s * ft:(s + 1) * ft] = k[:, f * ft:(f + 1) * ft]
            v_pool[:, s * ft:(s + 1) * ft] = v[:, f * ft:(f + 1) * ft]
        streamed[:, f0 * ft:f1 * ft] = run(backend, vidstream.cached_attention, q[:, f0 * ft:f1 * ft],
                                           k_pool, v_pool, torch.tensor(ranges, dtype=torch.int32))
    assert_close_to_oracle(streamed, oracle, eager, what="streamed vs oracle")
    assert_close_to_oracle(full, oracle, eager, what="full vs oracle")


# ----------------------------------------------------------------------------- opcheck, compile


def _native():
    if not vidstream._extension.load():
        pytest.skip("vidstream._C not built")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 4])
def test_opcheck_chunk_attention(dtype, window):
    _native()
    q, k, v = _qkv(1, 3 * 10, 3 * 10, 4, 2, 32, 32, dtype, "cpu")
    torch.library.opcheck(torch.ops.vidstream.chunk_attention.default, (q, k, v, 3, 2, 1, window, 0.2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_cached_attention(dtype):
    _native()
    q, k, v = _qkv(2, 11, 40, 4, 1, 32, 16, dtype, "cpu")
    kr = torch.tensor([[30, 40], [0, 7], [12, 12]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.vidstream.cached_attention.default, (q, k, v, kr, 0.2))


def test_compile_fullgraph():
    _native()
    q, k, v = _qkv(1, 24, 24, 4, 2, 32, 32, torch.float32, "cpu")
    kr = torch.tensor([[16, 24], [0, 4]], dtype=torch.int32)

    def f(q, k, v, kr):
        a = vidstream.chunk_attention(q, k, v, frame_tokens=4, chunk_frames=2, sink_frames=1,
                                      window_frames=4)
        b, lse = vidstream.cached_attention(a, k, v, kr, return_lse=True)
        return b * 2, lse

    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(q, k, v, kr), f(q, k, v, kr)):
        torch.testing.assert_close(got, want)


def test_default_backend_on_cpu_is_the_kernel():
    _native()
    q = torch.randn(1, 4, 2, 16)
    assert vidstream.backend_for("chunk_attention", q) == "cpu"
    assert vidstream.backend_for("cached_attention", q) == "cpu"


def test_grid_is_covered():
    # The §1 grid pairs every frame size with several masks (guards against an edit dropping some).
    seen = {(p.values[0], p.values[1], p.values[2] is None, p.values[3]) for p in _GRID}
    assert {ft for *_, ft in seen} == set(_FRAME_TOKENS)
    assert {(cf, sink) for cf, sink, _, _ in seen} >= set(itertools.product((1, 3), (0, 1, 3)))


def _triton_interpreted():
    from vidstream import triton_kernels

    if triton_kernels.mode() != "interpret":
        pytest.skip("Triton opcheck here runs under the interpreter only (TRITON_INTERPRET=1)")
    from vidstream.triton_kernels import attention

    return attention


@pytest.mark.parametrize("window", [None, 4])
def test_opcheck_triton_chunk_attention(window):
    kernels = _triton_interpreted()
    q, k, v = _qkv(1, 3 * 10, 3 * 10, 4, 2, 32, 32, torch.float32, "cpu")
    torch.library.opcheck(kernels.chunk_attention_triton, (q, k, v, 3, 2, 1, window, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_triton_cached_attention():
    kernels = _triton_interpreted()
    q, k, v = _qkv(2, 11, 40, 4, 1, 32, 16, torch.float32, "cpu")
    kr = torch.tensor([[30, 40], [0, 7], [12, 12]], dtype=torch.int32)
    torch.library.opcheck(kernels.cached_attention_triton, (q, k, v, kr, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- large logits

# Where eager PyTorch in half precision overflows (float16 q.k past 65504: scores of inf, then
# NaN) or loses the logits to rounding (bfloat16): the reference scores in float32 with the
# scale folded into q, so the rule measures the kernels against an eager error that is finite.
_LARGE = [pytest.param(torch.float16, 100.0, id="float16-x100"),
          pytest.param(torch.bfloat16, 10.0, id="bfloat16-x10")]


def _large_logit_qkv(dtype, gain, Lq, Lk, device):
    q = torch.randn(1, Lq, 4, 64) * gain
    k = torch.randn(1, Lk, 2, 64) * gain
    v = torch.randn(1, Lk, 2, 64)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu"),
                                            *backend_device_pairs()])
@pytest.mark.parametrize("dtype,gain", _LARGE)
def test_large_logits_half_precision(backend, device, dtype, gain):
    require(backend, "chunk_attention", device, dtype)
    q, k, v = _large_logit_qkv(dtype, gain, 24, 24, device)
    naive = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2))
    if dtype == torch.float16:
        assert not torch.isfinite(naive).all(), "the case must overflow eager float16 scores"
    kw = dict(frame_tokens=4, chunk_frames=2, sink_frames=1, window_frames=4)
    out, lse = _check(backend, vidstream.chunk_attention, reference.chunk_attention, (q, k, v), kw,
                      f"chunk {dtype} x{gain}")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    pool_k, pool_v = torch.cat([k, k]), torch.cat([v, v])  # batch 2: a second, shifted pool
    ranges = [[3, 20], [0, 2]]
    q2 = torch.cat([q[:, :7], q[:, 7:14]])
    out, lse = _check(backend, vidstream.cached_attention, reference.cached_attention,
                      (q2, pool_k, pool_v, ranges), {}, f"cached {dtype} x{gain}")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


# ----------------------------------------------------------------------------- §2 kv_deltas

# Per-range temporal offsets: (B, Lq, H, H_kv, D, Dv, pool, ranges, kv_deltas, per-head t_theta).
# Lq and range lengths off the kernels' tiles (CPU 128 x 64, CUDA 64 x 64), ranges out of pool
# order, empty and one-token ranges, negative, fractional, zero and large offsets.
_DELTA_CASES = {
    "gqa-odd": (2, 37, 4, 2, 64, 64, 150, [[120, 150], [0, 9], [30, 101], [9, 9]],
                [3.5, -2.25, 7.0, 1.0], False),
    "mqa-t_theta-one-token": (1, 130, 4, 1, 128, 128, 200,
                              [[150, 151], [0, 65], [70, 70], [80, 143]],
                              [-0.5, 12.0, 3.0, -7.75], True),
    "gqa-t_theta-zero-delta": (1, 21, 4, 2, 64, 64, 130, [[100, 130], [0, 17], [50, 51]],
                               [0.0, -1.0, 2.5], True),
    "small-head-dv": (2, 9, 2, 1, 16, 24, 40, [[13, 14], [20, 40], [0, 5]], [0.25, -3.0, 1e3],
                      True),
}
# Not the Triton interpreter: too slow for this grid (the Triton kernel's offsets have tests of
# their own).
_DELTA_PAIRS = [pytest.param("torch", "cpu", id="torch-cpu")] + [
    p for p in PAIRS if tuple(p.values) != ("triton", "cpu")]


def _delta_case(name, dtype, device):
    B, Lq, H, H_kv, D, Dv, P, ranges, deltas, per_head = _DELTA_CASES[name]
    q, k, v = _qkv(B, Lq, P, H, H_kv, D, Dv, dtype, device)
    kr = torch.tensor(ranges, dtype=torch.int32)
    t_theta = torch.linspace(7000.0, 13000.0, H_kv, device=device) if per_head else None
    return q, k, v, kr, dict(kv_deltas=deltas, t_theta=t_theta)




def _poison_outputs(q, v):
    """NaN-filled blocks of the outputs' sizes, freed just before the kernel allocates its own:
    an element it leaves unwritten then fails the comparison."""
    B, Lq, H, _ = q.shape
    for shape, dt in (((B, Lq, H, v.shape[3]), q.dtype), ((B, H, Lq), torch.float32)):
        torch.empty(shape, dtype=dt, device=q.device).fill_(float("nan"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend,device", _DELTA_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(_DELTA_CASES))
def test_cached_attention_kv_deltas(backend, device, dtype, case):
    """Against the float64 oracle (shift a copy of the pool, then attend), eager being the same
    in the kernel's dtype."""
    require(backend, "cached_attention", device, dtype)
    q, k, v, kr, kw = _delta_case(case, dtype, device)
    _serves(backend, q.shape[3], v.shape[3], dtype)
    _poison_outputs(q, v)
    _check(backend, vidstream.cached_attention, reference.cached_attention, (q, k, v, kr), kw,
           f"{backend} {case} {dtype}")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend,device", _DELTA_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cached_attention_kv_deltas_contract(backend, device, dtype):
    """cached_attention(q, k, v, r, kv_deltas=d) == cached_attention(q, rope3d_shift_(k.clone(),
    r, d), v, r) on one backend, up to rounding: of the rotation in float32 (the same table
    entries and expression: often bit for bit), and of the shifted keys, which rope3d_shift_
    stores in 16 bits and the CPU kernel keeps in float32."""
    require(backend, "cached_attention", device, dtype)
    q, k, v, kr, kw = _delta_case("mqa-t_theta-one-token", dtype, device)
    _serves(backend, q.shape[3], v.shape[3], dtype)
    shifted = vidstream.rope3d_shift_(k.clone(), kr, kw["kv_deltas"], t_theta=kw["t_theta"])
    out, lse = run(backend, vidstream.cached_attention, q, k, v, kr, **kw, return_lse=True)
    ref_out, ref_lse = run(backend, vidstream.cached_attention, q, shifted, v, kr, return_lse=True)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, ref_out, atol=4 * eps, rtol=4 * eps)
    torch.testing.assert_close(lse, ref_lse, atol=4 * eps, rtol=4 * eps)
    # The offsets matter: without them the result differs.
    assert not torch.allclose(out.float(), run(backend, vidstream.cached_attention, q, k, v,
                                               kr).float(), atol=1e-2)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend,device", _DELTA_PAIRS)
def test_cached_attention_kv_deltas_nan_inf(backend, device):
    """NaN and Inf as without offsets: a NaN/Inf key or value outside the ranges reaches no
    output; a NaN key inside makes NaN exactly the rows that read it (its batch entry and the
    query heads of its kv head), as the oracle says."""
    dtype = _dt(backend)
    require(backend, "cached_attention", device, dtype)
    q, k, v, kr, kw = _delta_case("gqa-odd", dtype, device)
    clean = run(backend, vidstream.cached_attention, q, k, v, kr, **kw)
    k[:, 101:120] = float("nan")  # between ranges
    v[:, 101:120] = float("inf")
    k[:, 9, :, 0] = float("-inf")  # the empty range [9, 9) holds no token
    out = run(backend, vidstream.cached_attention, q, k, v, kr, **kw)
    assert torch.equal(out, clean)
    k[1, 40, 1, 3] = float("nan")  # batch 1, kv head 1, a temporal channel, inside [30, 101)
    out, lse = run(backend, vidstream.cached_attention, q, k, v, kr, **kw, return_lse=True)
    oracle, oracle_lse = reference.cached_attention(q.double(), k.double(), v.double(), kr, **kw,
                                                    return_lse=True)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(oracle).cpu())
    assert torch.equal(torch.isnan(lse).cpu(), torch.isnan(oracle_lse).cpu())
    assert torch.isnan(out[1, :, 2:]).all() and not torch.isnan(out[0]).any()
    assert not torch.isnan(out[1, :, :2]).any()


@pytest.mark.usefixtures("one_thread")
def test_cached_attention_kv_deltas_op_checks():
    """The C++ op checks what its kernel indexes by: one float64 host offset per range, and
    t_theta per kv head."""
    _native()
    q, k, v = _qkv(1, 4, 20, 4, 2, 16, 16, torch.float32, "cpu")
    kr = torch.tensor([[0, 5], [8, 12]], dtype=torch.int32)
    op = torch.ops.vidstream.cached_attention
    good = torch.tensor([1.0, -2.0], dtype=torch.float64)
    op(q, k, v, kr, 0.25, good, 10000.0, None)
    with pytest.raises(RuntimeError, match=r"kv_deltas must have shape \[R\]"):
        op(q, k, v, kr, 0.25, good[:1], 10000.0, None)
    with pytest.raises(RuntimeError, match="kv_deltas must be float64"):
        op(q, k, v, kr, 0.25, good.float(), 10000.0, None)
    with pytest.raises(RuntimeError, match="t_theta must have shape"):
        op(q, k, v, kr, 0.25, good, 10000.0, torch.ones(4) * 1e4)
