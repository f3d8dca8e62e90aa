"""Fuzz tests of every public op on every backend that runs here, written to the contract
(docs/spec.md: Conventions: errors, strides and index arguments, NaN and Inf; issue #10).

Five classes of input; the number of cases run in each is printed at the end of the module:

1. bad input: a ValueError/TypeError naming the argument, nothing written (tests/fuzz_case.py);
2. layouts: index arguments of any integer dtype, view or nested list; strided, permuted, padded
   and expanded float inputs; pools with odd strides; overlapping or aliased pools refused alike
   on every backend; inputs that are views of the pools they are written into; degenerate shapes;
3. NaN/Inf: IEEE propagation like SDPA: what an output reads reaches it, what it does not read
   leaves it bitwise unchanged, only an empty allowed set gives zeros and lse = -inf;
   select_blocks ranks NaN scores above every number;
4. numerical extremes: float16 logits x100 and bfloat16 x10 against a float64 oracle (eager
   must not overflow there), extreme RoPE positions;
5. crash-prone inputs (huge, wrapping or overflowing integers, index views reaching a kernel):
   each in its own process (tests/fuzz_case.py forks a child per case).

The forked cases run in two background processes while the in-process tests run; their results
are the ``test_isolated`` items at the end. Inputs come from ``hypothesis`` with derandomized
settings (the same examples on every run) or from fixed tables.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import fuzz_case
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from numerics import assert_close_to_oracle, max_err, require

import vidstream
from vidstream import reference
from vidstream.ops.rope_math import rope_bands

# NaN and Inf inputs are the point of class 3: numpy's warnings about them (Triton interpreter).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

BACKENDS = ("reference", "cpu", "triton")
COUNTS: collections.Counter = collections.Counter()
HERE = os.path.dirname(os.path.abspath(__file__))
SHARDS = 2
RUNNER_TIMEOUT_S = 240
NAN = float("nan")


def fuzz(n: int):
    # No shrinking: a failure reports the example as drawn, and the module stays within its time.
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate), print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def examples(backend: str, n: int, n_triton: int, body):
    """Runs ``body(data)`` on ``n`` derandomized hypothesis examples (``n_triton`` on the Triton
    interpreter, which is slow)."""
    fuzz(n_triton if backend == "triton" else n)(given(data=st.data())(body))()


def dtypes_for(backend: str):
    """float32 and float16 everywhere; bfloat16 where the backend has it (not the Triton
    interpreter)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if backend != "triton" else [])


def run(backend: str, op: str, **kw):
    with vidstream.use_backend(backend):
        return getattr(vidstream, op)(**kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


# ----------------------------------------------------------------------------- the summary


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    lines = [f"class {c} {fuzz_case.CLASSES[c]}: {COUNTS[c]} cases" for c in sorted(fuzz_case.CLASSES)]
    lines.append(f"total: {sum(COUNTS.values())} cases")
    if tr is None or cap is None:
        print("\n".join(lines))
        return
    with cap.global_and_fixture_disabled():  # teardown output is captured otherwise
        tr.write_line("")
        tr.write_sep("-", "fuzz cases run, by class")
        for line in lines:
            tr.write_line(line)


# ----------------------------------------------------------------------------- the forked runner


class _Runner:
    """tests/fuzz_case.py in ``SHARDS`` background processes, started with the module so that
    they run beside the in-process tests; their output goes to files (a pipe would fill)."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.results, self.procs = None, []
        for i in range(SHARDS):
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            p = subprocess.Popen([sys.executable, os.path.join(HERE, "fuzz_case.py"), "--shard",
                                  f"{i}/{SHARDS}"], stdout=out, stderr=err, cwd=os.path.dirname(HERE),
                                 env=dict(os.environ))
            self.procs.append((p, out, err))

    def wait(self) -> dict:
        if self.results is not None:
            return self.results
        self.results, self.problems = {}, []
        for p, out, err in self.procs:
            try:
                p.wait(timeout=max(1.0, RUNNER_TIMEOUT_S - (time.monotonic() - self.t0)))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                self.problems.append(f"runner killed after {RUNNER_TIMEOUT_S} s")
            if p.returncode:
                self.problems.append(f"runner exited with {p.returncode}")
            out.seek(0)
            err.seek(0)
            for line in out.read().splitlines():
                if line.startswith("FUZZ "):
                    rec = json.loads(line[5:])
                    self.results[rec["id"]] = rec
            tail = err.read()[-2000:]
            if p.returncode and tail:
                self.problems.append(tail)
        return self.results

    def stop(self):
        for p, out, err in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
            err.close()


@pytest.fixture(scope="module", autouse=True)
def _runner(request):
    if not any(item.name.startswith("test_isolated") for item in request.session.items):
        yield None
        return
    r = _Runner()
    yield r
    r.stop()


# ----------------------------------------------------------------------------- random inputs


def draw_ranges(data, P: int, max_ranges: int = 4) -> list:
    """Disjoint half-open ranges inside [0, P), some empty, some adjacent, in any order."""
    cuts = sorted(data.draw(st.lists(st.integers(0, P), max_size=2 * max_ranges), label="cuts"))
    pairs = [[cuts[i], cuts[i + 1]] for i in range(0, len(cuts) - 1, 2)]
    return data.draw(st.permutations(pairs), label="ranges")


def draw_slots(data, F: int, hw: int, extra: int) -> list:
    """F non-overlapping frame slots of hw tokens in a pool of F*hw + extra, in any order."""
    gaps = [data.draw(st.integers(0, extra), label="gap") for _ in range(F)]
    starts, pos, used = [], 0, 0
    for gap in gaps:
        gap = min(gap, extra - used)
        used += gap
        pos += gap
        starts.append(pos)
        pos += hw
    return data.draw(st.permutations(starts), label="slots")


def positions(data, n: int) -> list:
    return [data.draw(st.floats(-50, 50, allow_nan=False, width=32), label="pos") for _ in range(n)]


def draw_case(op: str, data, backend: str, dtype) -> tuple[dict, tuple, tuple]:
    """Valid random arguments of ``op``: (kwargs, the float inputs, the in-place outputs)."""
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)

    def r(*shape, gain=1.0):
        return (torch.randn(*shape, generator=g) * gain).to(dtype)

    B = data.draw(st.integers(1, 2), label="B")
    Hkv = data.draw(st.sampled_from([1, 2]), label="H_kv")
    H = Hkv * data.draw(st.sampled_from([1, 2]), label="group")
    if op == "chunk_attention":
        D, Dv = data.draw(st.sampled_from([4, 8]), label="D"), data.draw(st.sampled_from([4, 6]), label="Dv")
        ft, frames = data.draw(st.integers(1, 3), label="ft"), data.draw(st.integers(1, 5), label="frames")
        cf = data.draw(st.integers(1, 3), label="cf")
        window = data.draw(st.one_of(st.none(), st.integers(cf, cf + 2)), label="window")
        L = ft * frames
        kw = dict(q=r(B, L, H, D), k=r(B, L, Hkv, D), v=r(B, L, Hkv, Dv), frame_tokens=ft, chunk_frames=cf,
                  sink_frames=data.draw(st.integers(0, 2), label="sink"), window_frames=window,
                  return_lse=True)
        return kw, ("q", "k", "v"), ()
    if op == "cached_attention":
        D, Dv = data.draw(st.sampled_from([4, 8]), label="D"), data.draw(st.sampled_from([4, 6]), label="Dv")
        Lq, P = data.draw(st.integers(1, 5), label="Lq"), data.draw(st.integers(0, 16), label="P")
        kw = dict(q=r(B, Lq, H, D), k_pool=r(B, P, Hkv, D), v_pool=r(B, P, Hkv, Dv),
                  kv_ranges=draw_ranges(data, P), return_lse=True)
        return kw, ("q", "k_pool", "v_pool"), ()
    D = data.draw(st.sampled_from([2, 4, 8, 12]), label="D")
    tt = None
    if op.startswith("rope3d") and data.draw(st.booleans(), label="t_theta"):
        tt = 10000.0 * (1 + 0.2 * torch.rand(Hkv if op == "rope3d_store_" else H, generator=g))
    if op == "rope3d":
        F, h, w = (data.draw(st.integers(a, 3), label=n) for a, n in ((0, "F"), (1, "h"), (1, "w")))
        kw = dict(x=r(B, F * h * w, H, D), grid=(F, h, w), t_theta=tt,
                  frame_offset=data.draw(st.floats(-100, 100, allow_nan=False), label="offset"))
        return kw, ("x",), ()
    if op == "rope3d_shift_":
        P = data.draw(st.integers(1, 16), label="P")
        rng = draw_ranges(data, P)
        kw = dict(k_pool=r(B, P, H, D), ranges=rng, delta_frames=positions(data, len(rng)), t_theta=tt)
        return kw, ("k_pool",), ("k_pool",)
    if op == "rope3d_store_":
        F, h, w = (data.draw(st.integers(a, 2), label=n) for a, n in ((1, "F"), (1, "h"), (1, "w")))
        extra = data.draw(st.integers(0, 5), label="extra")
        Dv = data.draw(st.sampled_from([2, 6]), label="Dv")
        P = F * h * w + extra
        kw = dict(k_pool=r(B, P, Hkv, D), v_pool=r(B, P, Hkv, Dv), k=r(B, F * h * w, Hkv, D),
                  v=r(B, F * h * w, Hkv, Dv), frame_slots=draw_slots(data, F, h * w, extra),
                  frame_pos=positions(data, F), grid=(F, h, w), t_theta=tt)
        return kw, ("k_pool", "v_pool", "k", "v"), ("k_pool", "v_pool")
    if op == "select_blocks":
        Lq, P = data.draw(st.integers(1, 9), label="Lq"), data.draw(st.integers(1, 16), label="P")
        rng = draw_ranges(data, P)
        heads = data.draw(st.one_of(st.none(), st.lists(st.integers(0, H - 1), min_size=1, unique=True)),
                          label="heads")
        kw = dict(q=r(B, Lq, H, D), k_pool=r(B, P, Hkv, D), block_ranges=rng,
                  k=data.draw(st.integers(0, len(rng) + 1), label="k"),
                  query_stride=data.draw(st.integers(1, 4), label="stride"), heads=heads,
                  score=data.draw(st.sampled_from(["mean", "max"]), label="score"))
        return kw, ("q", "k_pool"), ()
    # low-rank
    P = data.draw(st.integers(0, 12), label="P")
    d_c, d_nope = data.draw(st.integers(1, 6), label="d_c"), data.draw(st.integers(1, 4), label="d_nope")
    d_v, d_r = data.draw(st.integers(1, 5), label="d_v"), data.draw(st.integers(0, 3), label="d_r")
    kw = dict(c_pool=r(B, P, d_c), w_uk=r(H, d_c, d_nope, gain=d_c**-0.5), w_uv=r(H, d_c, d_v),
              kv_ranges=draw_ranges(data, P), k_r_pool=r(B, P, d_r) if d_r else None)
    names = ("c_pool", "w_uk", "w_uv") + (("k_r_pool",) if d_r else ())
    if op == "lowrank_cached_attention":
        kw["q"] = r(B, data.draw(st.integers(1, 4), label="Lq"), H, d_nope + d_r)
        kw["return_lse"] = True
        kw["strategy"] = data.draw(st.sampled_from(
            [None, "decompress", "absorb"] + (["tiled"] if backend == "cpu" else [])), label="strategy")
        names = ("q",) + names
    return kw, names, ()


def plain(kw: dict, names, dtype=None) -> dict:
    """A copy of ``kw`` with contiguous clones of the float inputs (cast to ``dtype``)."""
    out = dict(kw)
    for n in names:
        if kw.get(n) is not None:
            t = kw[n].contiguous().clone()
            out[n] = t.to(dtype) if dtype is not None else t
    return out


def outputs(op: str, backend: str, kw: dict, inplace) -> tuple:
    res = run(backend, op, **kw)
    return tuple(kw[n] for n in inplace) if inplace else as_tuple(res)


def assert_picks(got: torch.Tensor, scores: torch.Tensor, k: int, nan_blocks=(), what=""):
    """select_blocks' indices: the NaN blocks first (smaller index among them), then the k
    highest float64 ``scores`` (ties to the smaller index), ascending. Blocks whose score is
    within rounding of the boundary may trade places."""
    M = scores.shape[0]
    nan_blocks = sorted(nan_blocks)
    finite = [m for m in range(M) if m not in nan_blocks]
    order = sorted(finite, key=lambda m: (-float(scores[m]), m))
    want = sorted((nan_blocks + order)[:min(k, M)])
    got_l = got.cpu().tolist()
    assert got.dtype == torch.int64 and got_l == sorted(got_l), f"{what}: {got_l} not ascending int64"
    if got_l == want:
        return
    assert len(got_l) == len(want), f"{what}: picked {got_l}, expected {want}"
    take = min(k, M) - len(nan_blocks)
    assert take >= 0 and set(nan_blocks) <= set(got_l) or take < 0 and set(got_l) == set(want), (
        f"{what}: picked {got_l}, expected {want} (NaN blocks {nan_blocks} rank first)")
    assert 0 < take < len(order), f"{what}: picked {got_l}, expected {want}"
    edge = float(scores[order[take - 1]])
    tol = 1e-3 * (1.0 + float(scores[finite].abs().max()))
    for m in set(got_l) ^ set(want):
        assert abs(float(scores[m]) - edge) <= tol, f"{what}: picked {got_l}, expected {want}"


# ----------------------------------------------------------------------------- class 2: layouts

READ_LAYOUTS = ("contiguous", "permuted", "outer-swapped", "dstride2", "padded", "odd-strides", "expanded")
POOL_LAYOUTS = ("contiguous", "permuted", "outer-swapped", "dstride2", "padded", "odd-strides")


def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of ``t`` (or, for "expanded", a stride-0 version) in another memory layout;
    the buffer around a view holds NaN, so reading past the view shows."""
    if kind == "contiguous" or t.dim() < 2:
        return t.clone()
    if kind == "permuted":  # last two dims swapped in memory ([B, P, D, H] storage)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "outer-swapped":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "expanded":
        d = 0 if t.shape[0] > 1 else 1
        return t.narrow(d, 0, min(1, t.shape[d])).expand_as(t) if t.shape[d] else t.clone()
    if kind == "dstride2":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), NAN, dtype=t.dtype)
        v = buf[..., ::2]
    elif kind == "padded":
        buf = torch.full(tuple(s + 3 for s in t.shape), NAN, dtype=t.dtype)
        v = buf[tuple(slice(1, 1 + s) for s in t.shape)]
    elif kind == "odd-strides":
        buf = torch.full(tuple(3 * s + 1 for s in t.shape), NAN, dtype=t.dtype)
        v = buf[tuple(slice(0, 3 * s, 3) for s in t.shape)]
    else:
        raise KeyError(kind)
    v.copy_(t)
    return v


def outside_view(v: torch.Tensor):
    """(buffer, bool mask of the elements outside view ``v``) for a view we made, else None."""
    base = v._base
    if base is None or not base.is_contiguous():
        return None
    m = torch.zeros(base.numel(), dtype=torch.bool)
    m.as_strided(v.shape, v.stride(), v.storage_offset()).fill_(True)
    return base, ~m


def check_against_reference(op, backend, kw, names, inplace, what):
    """``kw`` on ``backend`` vs the float64 reference and eager reference of the same values
    stored contiguously."""
    oracle = outputs(op, "reference", plain(kw, names, torch.float64), inplace)
    eager = outputs(op, "reference", plain(kw, names), inplace)
    pads = [outside_view(kw[n]) for n in inplace]
    before = [(b, bits(b)) for b, _ in (p for p in pads if p is not None)]
    got = outputs(op, backend, kw, inplace)
    for (b, b0), (_, outside) in zip(before, (p for p in pads if p is not None)):
        assert torch.equal(bits(b).reshape(-1)[outside], b0.reshape(-1)[outside]), (
            f"{what}: wrote outside the pool's view")
    if op == "select_blocks":
        s = reference.block_scores(kw["q"].double(), kw["k_pool"].double(), kw["block_ranges"],
                                   query_stride=kw["query_stride"], heads=kw["heads"], score=kw["score"])
        assert_picks(got[0], s, kw["k"], what=what)
        return
    assert len(got) == len(oracle), what
    for i, (g_, o, e) in enumerate(zip(got, oracle, eager)):
        assert_close_to_oracle(g_, o, e, what=f"{what} output {i}")


OPS = ("rope3d", "rope3d_shift_", "rope3d_store_", "chunk_attention", "cached_attention", "select_blocks",
       "lowrank_decompress", "lowrank_cached_attention")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_strided_inputs(op, backend):
    """Class 2: float inputs of any strides (padded views, head-dim stride 2, permuted or
    stride-0 storage) and in-place pools of any non-overlapping strides give the result of
    contiguous inputs."""
    examples(backend, 6, 4, lambda data: _strided_inputs(op, backend, data))


def _strided_inputs(op, backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    require(backend, op, "cpu", dtype)
    kw, names, inplace = draw_case(op, data, backend, dtype)
    layouts = {}
    for n in names:
        if kw.get(n) is None:
            continue
        kind = data.draw(st.sampled_from(POOL_LAYOUTS if n in inplace else READ_LAYOUTS), label=n)
        layouts[n] = kind
        kw[n] = relayout(kw[n], kind)
    COUNTS[2] += 1
    check_against_reference(op, backend, kw, names, inplace, f"{op} on {backend}, {dtype}, {layouts}")


def _pool_layout_case(op: str, dtype):
    g = torch.Generator().manual_seed(17)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if op == "rope3d_shift_":
        kw = dict(k_pool=r(2, 14, 3, 12), ranges=[[9, 14], [0, 4], [5, 5]], delta_frames=[2.5, -7.0, 1.0],
                  t_theta=torch.tensor([1e4, 2e4, 5e3]))
        return kw, ("k_pool",), ("k_pool",)
    kw = dict(k_pool=r(2, 14, 3, 12), v_pool=r(2, 14, 3, 6), k=r(2, 8, 3, 12), v=r(2, 8, 3, 6),
              frame_slots=[9, 0], frame_pos=[11.5, -3.0], grid=(2, 2, 2))
    return kw, ("k_pool", "v_pool", "k", "v"), ("k_pool", "v_pool")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", POOL_LAYOUTS)
@pytest.mark.parametrize("op", ["rope3d_shift_", "rope3d_store_"])
def test_inplace_pool_layouts(op, layout, backend):
    """Class 2: every non-overlapping pool layout (head-dim stride 2, [B, P, D, H] storage, a
    view inside a bigger buffer, odd strides in every dim) is written correctly, and nothing
    outside the view is touched; k / v (store) in the same layout."""
    dtype = torch.float32 if backend == "triton" else torch.bfloat16
    require(backend, op, "cpu", dtype)
    kw, names, inplace = _pool_layout_case(op, dtype)
    for n in names:
        kw[n] = relayout(kw[n], layout)
    COUNTS[2] += 1
    check_against_reference(op, backend, kw, names, inplace, f"{op} pools {layout} on {backend}")


def _refused_cases():
    """In-place pools whose elements share memory, and pools that share memory with each
    other: (op, label, kwargs builder)."""
    g = torch.Generator().manual_seed(3)

    def r(*s):
        return torch.randn(*s, generator=g)

    def shift(kp):
        return dict(k_pool=kp, ranges=[[0, 4], [6, 10]], delta_frames=[1.0, 2.0])

    def store(kp, vp):
        return dict(k_pool=kp, v_pool=vp, k=r(1, 8, kp.shape[2], 8), v=r(1, 8, kp.shape[2], vp.shape[3]),
                    frame_slots=[0, 4], frame_pos=[0.0, 1.0], grid=(2, 2, 2))

    buf = r(1 * 12 * 2 * 8)
    yield "rope3d_shift_", "k_pool-expanded-batch", lambda: shift(r(1, 12, 2, 8).expand(2, -1, -1, -1))
    yield "rope3d_shift_", "k_pool-expanded-tokens", lambda: shift(r(1, 1, 2, 8).expand(1, 12, 2, 8))
    yield "rope3d_shift_", "k_pool-expanded-heads", lambda: shift(r(1, 12, 1, 8).expand(1, 12, 2, 8))
    yield "rope3d_shift_", "k_pool-expanded-head-dim", lambda: shift(r(1, 12, 2, 1).expand(1, 12, 2, 8))
    yield "rope3d_shift_", "k_pool-tokens-overlap", lambda: shift(buf.clone().as_strided((1, 12, 2, 8),
                                                                                        (192, 4, 8, 1)))
    yield "rope3d_shift_", "k_pool-heads-overlap", lambda: shift(buf.clone().as_strided((1, 12, 2, 8),
                                                                                       (192, 16, 4, 1)))
    yield "rope3d_store_", "k_pool-expanded", lambda: store(r(1, 1, 1, 8).expand(1, 12, 1, 8),
                                                            r(1, 12, 1, 8))
    yield "rope3d_store_", "v_pool-expanded", lambda: store(r(1, 12, 1, 8),
                                                            r(1, 12, 1, 1).expand(1, 12, 1, 8))
    yield "rope3d_store_", "k_pool-tokens-overlap", lambda: store(
        buf.clone().as_strided((1, 12, 1, 8), (96, 4, 8, 1)), r(1, 12, 1, 8))
    yield "rope3d_store_", "v_pool-is-k_pool", lambda: (lambda kp: store(kp, kp))(r(1, 12, 1, 8))
    yield "rope3d_store_", "v_pool-overlaps-k_pool", lambda: (lambda b: store(b[..., :8], b[..., 4:12]))(
        r(1, 12, 1, 12))
    yield "rope3d_store_", "v_pool-shifted-k_pool", lambda: (lambda b: store(b[:, :12], b[:, 2:14]))(
        r(1, 16, 1, 8))


REFUSED = list(_refused_cases())


@pytest.mark.parametrize("op,label,make", REFUSED, ids=[f"{o}-{lbl}" for o, lbl, _ in REFUSED])
def test_overlapping_pools_refused(op, label, make):
    """Class 2: a pool written in place whose elements share memory (expanded, stride 0,
    overlapping strides) or that shares memory with the other pool is refused with one and the
    same ValueError on every backend, naming the pool, and nothing is written."""
    messages = {}
    for backend in BACKENDS:
        if fuzz_case.testing.why_not(backend, op, "cpu", torch.float32) is not None:
            continue
        kw = make()
        pools = [kw[n] for n in fuzz_case.INPLACE[op]]
        before = [fuzz_case.bits(p) for p in pools]
        COUNTS[2] += 1
        with pytest.raises(ValueError) as e:
            run(backend, op, **kw)
        assert any(n in str(e.value) for n in ("k_pool", "v_pool")), f"{backend}: {e.value}"
        for p, b in zip(pools, before):
            assert torch.equal(fuzz_case.bits(p), b), f"{backend} wrote before raising: {e.value}"
        messages[backend] = str(e.value)
    assert len(set(messages.values())) <= 1, f"backends refuse with different messages: {messages}"


def _alias_cases():
    """rope3d_store_ inputs that are views of the pools written (the result is as if they were
    read first), pools that are disjoint views of one buffer, and a read-only pool given twice.
    Each builder takes ``r(*shape)`` (random values). With frame_slots [8, 0], frame 0 is written
    where a view of the pool holds frame 1."""
    def store(kp, vp, k, v, slots):
        return dict(k_pool=kp, v_pool=vp, k=k, v=v, frame_slots=slots, frame_pos=[0.5, 3.0], grid=(2, 2, 2))

    def views(which):
        def make(r):
            kp, vp = r(1, 16, 1, 8), r(1, 16, 1, 8)
            src = {"k_pool": kp, "v_pool": vp}
            k = src[which[0]][:, 4:12] if which[0] else r(1, 8, 1, 8)
            v = src[which[1]][:, 4:12] if which[1] else r(1, 8, 1, 8)
            return store(kp, vp, k, v, [8, 0])
        return make

    yield "rope3d_store_", "k-view-of-k_pool", views(("k_pool", None))
    yield "rope3d_store_", "v-view-of-v_pool", views((None, "v_pool"))
    yield "rope3d_store_", "k-view-of-v_pool", views(("v_pool", None))
    yield "rope3d_store_", "v-view-of-k_pool", views((None, "k_pool"))
    yield "rope3d_store_", "k-and-v-views-of-their-pools", views(("k_pool", "v_pool"))

    def packed(r):
        b = r(1, 16, 2, 14)
        return store(b[..., :8], b[..., 8:], r(1, 8, 2, 8), r(1, 8, 2, 6), [0, 8])

    def layers(r):
        b = r(2, 1, 16, 1, 8)
        return store(b[0], b[1], r(1, 8, 1, 8), r(1, 8, 1, 8), [4, 12])

    def same_pool(r):
        kp = r(1, 12, 1, 8)
        return dict(q=r(1, 3, 2, 8), k_pool=kp, v_pool=kp, kv_ranges=[[2, 9]], return_lse=True)

    def q_of_pool(r):
        kp = r(1, 12, 1, 8)
        return dict(q=kp[:, :5].expand(-1, -1, 2, -1), k_pool=kp, block_ranges=[[0, 3], [3, 8], [8, 12]], k=2,
                    query_stride=1)

    yield "rope3d_store_", "packed-kv-buffer", packed
    yield "rope3d_store_", "pools-of-one-layered-buffer", layers
    yield "cached_attention", "v_pool-is-k_pool", same_pool
    yield "select_blocks", "q-view-of-k_pool", q_of_pool


ALIASES = list(_alias_cases())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,label,make", ALIASES, ids=[f"{o}-{lbl}" for o, lbl, _ in ALIASES])
def test_inputs_alias_outputs(op, label, make, backend):
    """Class 2: inputs that are views of the pools an op writes give the result of reading them
    first; disjoint views of one buffer are valid pools."""
    require(backend, op, "cpu", torch.float32)
    g = torch.Generator().manual_seed(5)
    kw = make(lambda *s: torch.randn(*s, generator=g))
    names = [n for n, v in kw.items() if isinstance(v, torch.Tensor)]
    inplace = fuzz_case.INPLACE.get(op, ())
    # The expected values: every tensor cloned (no aliasing left), then the reference.
    want = outputs(op, "reference", {n: (v.clone() if n in names else v) for n, v in kw.items()}, inplace)
    want64 = outputs(op, "reference", {n: (v.double() if n in names else v) for n, v in kw.items()}, inplace)
    COUNTS[2] += 1
    got = outputs(op, backend, kw, inplace)
    if op == "select_blocks":
        s = reference.block_scores(kw["q"].double(), kw["k_pool"].double(), kw["block_ranges"],
                                   query_stride=kw["query_stride"])
        assert_picks(got[0], s, kw["k"], what=f"{label} on {backend}")
        return
    for i, (g_, w, o) in enumerate(zip(got, want, want64)):
        assert_close_to_oracle(g_, o, w, what=f"{op} {label} on {backend} output {i}")


# ----------------------------------------------------------------------------- class 3: NaN / Inf

# Expected state of each output element after a poisoned input.
SAME, IS_NAN, POS_INF, NEG_INF, NON_FINITE, FINITE = range(6)


def check_pattern(got: torch.Tensor, clean: torch.Tensor, code: torch.Tensor, oracle, eager, what: str):
    """``got`` against the expected state of each element: SAME (what the clean run gives: with
    an ``oracle``, the clean run's non-finite pattern and the accuracy rule, since a kernel may
    take another summation order once a block holds a non-finite value; without, bitwise),
    IS_NAN, POS_INF, NEG_INF, NON_FINITE, or FINITE (within the accuracy rule of the oracle)."""
    assert got.shape == code.shape, what
    same = code == SAME
    if bool(same.any()) and oracle is None:
        diff = same & (bits(got) != bits(clean))
        assert not bool(diff.any()), (
            f"{what}: {int(diff.sum())} outputs that do not read the poisoned element changed, e.g. at "
            f"{diff.nonzero()[0].tolist()}: {got[diff][:4].tolist()} vs clean {clean[diff][:4].tolist()}")
    elif bool(same.any()):
        for pred in (torch.isnan, torch.isposinf, torch.isneginf):
            diff = same & (pred(got) != pred(clean))
            assert not bool(diff.any()), (
                f"{what}: {int(diff.sum())} outputs that do not read the poisoned element changed "
                f"({pred.__name__}), e.g. at {diff.nonzero()[0].tolist()}: {got[diff][:4].tolist()} vs "
                f"clean {clean[diff][:4].tolist()}")
        m = same & torch.isfinite(clean)
        assert_close_to_oracle(got[m], oracle[m], eager[m], what=f"{what} (outputs that do not read it)")
    for c, pred, name in ((IS_NAN, torch.isnan, "NaN"), (POS_INF, torch.isposinf, "+inf"),
                          (NEG_INF, torch.isneginf, "-inf"), (NON_FINITE, lambda t: ~torch.isfinite(t),
                                                              "non-finite")):
        m = code == c
        if bool(m.any()):
            bad = m & ~pred(got)
            assert not bool(bad.any()), (
                f"{what}: {int(bad.sum())} of {int(m.sum())} outputs that read the poison are not {name}, "
                f"e.g. at {bad.nonzero()[0].tolist()}: {got[bad][:4].tolist()}")
    m = code == FINITE
    if bool(m.any()):
        assert bool(torch.isfinite(got[m]).all()), f"{what}: non-finite where a finite value is due"
        assert_close_to_oracle(got[m], oracle[m], eager[m], what=what)


def poison_value(kind: str) -> float:
    return {"nan": NAN, "+inf": math.inf, "-inf": -math.inf}[kind]


def allowed_matrix(op: str, kw: dict) -> torch.Tensor:
    """bool [Lq, Lk]: which keys each query reads, from the contract (docs/spec.md §1, §2)."""
    if op == "chunk_attention":
        L = kw["q"].shape[1]
        idx = torch.arange(L)
        fr = idx // kw["frame_tokens"]
        ch = fr // kw["chunk_frames"]
        end = (ch + 1) * kw["chunk_frames"]
        a = ch[None, :] <= ch[:, None]
        if kw["window_frames"] is not None:
            a &= (fr[None, :] < kw["sink_frames"]) | (fr[None, :] >= end[:, None] - kw["window_frames"])
        return a
    P = kw["k_pool"].shape[1]
    keep = torch.zeros(P, dtype=torch.bool)
    for s, e in kw["kv_ranges"]:
        keep[s:e] = True
    return keep[None, :].expand(kw["q"].shape[1], P)


def attention_codes(op, kw, where, pos, kind):
    """Expected (out code [B, Lq, H, Dv], lse code [B, H, Lq]) for ``kind`` at ``kw[where][pos]``."""
    q, kk = kw["q"], kw["k" if op == "chunk_attention" else "k_pool"]
    B, Lq, H, _ = q.shape
    Dv = kw["v" if op == "chunk_attention" else "v_pool"].shape[3]
    group = H // kk.shape[2]
    A = allowed_matrix(op, kw)
    out = torch.full((B, Lq, H, Dv), SAME)
    lse = torch.full((B, H, Lq), SAME)
    val = poison_value(kind)
    b = pos[0]
    if where == "q":
        _, i, h, _ = pos
        if bool(A[i].any()):
            out[b, i, h] = IS_NAN  # a NaN score, or +inf (inf - inf), or only -inf scores
            lse[b, h, i] = IS_NAN if kind == "nan" else NON_FINITE
        return out, lse
    _, j, hk, d = pos
    for h in range(hk * group, (hk + 1) * group):
        for i in range(Lq):
            if not bool(A[i, j]):
                continue
            if where.startswith("v"):
                out[b, i, h, d] = {"nan": IS_NAN, "+inf": POS_INF, "-inf": NEG_INF}[kind]
            elif kind == "nan":
                out[b, i, h] = IS_NAN
                lse[b, h, i] = IS_NAN
            elif float(q[b, i, h, d]) * val > 0:  # a score of +inf: inf - inf in the softmax
                out[b, i, h] = IS_NAN
                lse[b, h, i] = NON_FINITE
            elif int(A[i].sum()) == 1:  # its only key scores -inf
                out[b, i, h] = IS_NAN
                lse[b, h, i] = NON_FINITE
            else:  # that key drops out of the softmax
                out[b, i, h] = FINITE
                lse[b, h, i] = FINITE
    return out, lse


def _float_names(op):
    return {"chunk_attention": ("q", "k", "v"), "cached_attention": ("q", "k_pool", "v_pool")}[op]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["chunk_attention", "cached_attention"])
def test_nan_inf_attention(op, backend):
    """Class 3: one NaN or ±Inf in q, k or v (inside or outside what each query reads)."""
    examples(backend, 10, 6, lambda data: _nan_inf_attention(op, backend, data))


KINDS = ["nan", "+inf", "-inf"]


def draw_poisoned_case(op, backend, data, kinds=lambda where: KINDS):
    """A case of ``op`` in a dtype ``backend`` runs here, and the argument, element and
    "nan" | "+inf" | "-inf" to poison: (dtype, kw, names, inplace, where, pos, kind), or None
    when the drawn tensor is empty."""
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    require(backend, op, "cpu", dtype)
    kw, names, inplace = draw_case(op, data, backend, dtype)
    where = data.draw(st.sampled_from(names), label="where")
    t = kw[where]
    if t.numel() == 0:
        return None
    pos = tuple(data.draw(st.integers(0, s - 1), label=f"pos{i}") for i, s in enumerate(t.shape))
    kind = data.draw(st.sampled_from(kinds(where)), label="kind")
    return dtype, kw, names, inplace, where, pos, kind


def _nan_inf_attention(op, backend, data):
    drawn = draw_poisoned_case(op, backend, data)
    if drawn is None:
        return
    _, kw, names, _, where, pos, kind = drawn
    check_poisoned_attention(op, backend, kw, names, where, pos, kind)


def check_poisoned_attention(op, backend, kw, names, where, pos, kind):
    dtype = kw["q"].dtype
    clean = run(backend, op, **plain(kw, names))
    poisoned = plain(kw, names)
    poisoned[where][pos] = poison_value(kind)
    out_code, lse_code = attention_codes(op, poisoned, where, pos, kind)
    oracle = run("reference", op, **plain(poisoned, names, torch.float64))
    eager = run("reference", op, **plain(poisoned, names))
    got = run(backend, op, **plain(poisoned, names))
    COUNTS[3] += 1
    what = f"{op} on {backend} ({dtype}), {kind} in {where}{list(pos)}"
    check_pattern(got[0], clean[0], out_code, oracle[0], eager[0], what + ": out")
    check_pattern(got[1], clean[1], lse_code, oracle[1], eager[1], what + ": lse")
    empty = ~allowed_matrix(op, kw).any(1)
    if bool(empty.any()):
        assert bool((got[0][:, empty] == 0).all()) and bool((got[1][:, :, empty] == -math.inf).all()), (
            f"{what}: a query with an empty allowed set must give 0 and lse = -inf")


def _spec_example(r):
    """docs/spec.md §1's worked example (L = 6, one token per frame, chunks of 2, sink 1, window
    4): queries 4 and 5 do not see key 1."""
    return dict(q=r(1, 6, 2, 4), k=r(1, 6, 1, 4), v=r(1, 6, 1, 4), frame_tokens=1, chunk_frames=2,
                sink_frames=1, window_frames=4, return_lse=True)


def _pool_case(r, ranges):
    return dict(q=r(1, 4, 2, 8), k_pool=r(1, 12, 1, 8), v_pool=r(1, 12, 1, 8), kv_ranges=ranges,
                return_lse=True)


# (op, label, kwargs builder, poisoned tensor, position, kind): the cases of issue #10.
POISON_TABLE = [
    ("chunk_attention", "nan-in-one-q", _spec_example, "q", (0, 3, 1, 2), "nan"),
    ("chunk_attention", "+inf-in-k", _spec_example, "k", (0, 2, 0, 1), "+inf"),
    ("chunk_attention", "-inf-in-k", _spec_example, "k", (0, 3, 0, 0), "-inf"),
    ("chunk_attention", "nan-in-k-of-the-sink", _spec_example, "k", (0, 0, 0, 3), "nan"),
    ("chunk_attention", "nan-in-v-outside-the-window", _spec_example, "v", (0, 1, 0, 2), "nan"),
    ("chunk_attention", "+inf-in-v-outside-the-window", _spec_example, "v", (0, 1, 0, 0), "+inf"),
    ("chunk_attention", "nan-in-v-of-a-later-chunk", _spec_example, "v", (0, 5, 0, 1), "nan"),
    ("cached_attention", "nan-in-one-q", lambda r: _pool_case(r, [[0, 5], [8, 12]]), "q", (0, 1, 0, 0),
     "nan"),
    ("cached_attention", "+inf-in-k_pool", lambda r: _pool_case(r, [[0, 5], [8, 12]]), "k_pool", (0, 9, 0, 2),
     "+inf"),
    ("cached_attention", "nan-in-k_pool-outside-the-ranges", lambda r: _pool_case(r, [[0, 5], [8, 12]]),
     "k_pool", (0, 6, 0, 2), "nan"),
    ("cached_attention", "nan-in-v_pool-outside-the-ranges", lambda r: _pool_case(r, [[0, 5], [8, 12]]),
     "v_pool", (0, 7, 0, 2), "nan"),
    ("cached_attention", "nan-in-q-empty-union", lambda r: _pool_case(r, [[3, 3]]), "q", (0, 1, 0, 0), "nan"),
    ("cached_attention", "nan-in-k_pool-empty-union", lambda r: _pool_case(r, []), "k_pool", (0, 1, 0, 0),
     "nan"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,label,make,where,pos,kind", POISON_TABLE,
                         ids=[f"{c[0]}-{c[1]}" for c in POISON_TABLE])
def test_nan_inf_issue_cases(op, label, make, where, pos, kind, backend):
    """Class 3: the NaN/Inf cases of issue #10, each backend against the contract."""
    require(backend, op, "cpu", torch.float32)
    g = torch.Generator().manual_seed(11)
    kw = make(lambda *s: torch.randn(*s, generator=g))
    check_poisoned_attention(op, backend, kw, _float_names(op), where, pos, kind)


def lowrank_codes(op, kw, where, pos, kind):
    """Expected codes of lowrank_cached_attention (out, lse) or lowrank_decompress (k, v)."""
    c = kw["c_pool"]
    B, P, _ = c.shape
    H, _, d_nope = kw["w_uk"].shape
    d_v = kw["w_uv"].shape[2]
    d_r = 0 if kw["k_r_pool"] is None else kw["k_r_pool"].shape[2]
    tokens = [j for s, e in kw["kv_ranges"] for j in range(s, e)]
    if op == "lowrank_decompress":
        k = torch.full((B, len(tokens), H, d_nope + d_r), SAME)
        v = torch.full((B, len(tokens), H, d_v), SAME)
        if where in ("c_pool", "k_r_pool"):
            b, j, ch = pos
            for n in (n for n, t in enumerate(tokens) if t == j):
                if where == "c_pool":
                    k[b, n, :, :d_nope] = IS_NAN
                    v[b, n] = IS_NAN
                else:
                    k[b, n, :, d_nope + ch] = IS_NAN
        elif where == "w_uk":
            k[:, :, pos[0], pos[2]] = IS_NAN
        else:
            v[:, :, pos[0], pos[2]] = IS_NAN
        return k, v
    q = kw["q"]
    Lq = q.shape[1]
    out = torch.full((B, Lq, H, d_v), SAME)
    lse = torch.full((B, H, Lq), SAME)
    if not tokens:
        return out, lse
    if where == "q":
        b, i, h, _ = pos
        out[b, i, h] = IS_NAN
        lse[b, h, i] = IS_NAN if kind == "nan" else NON_FINITE
    elif where in ("c_pool", "k_r_pool"):
        if pos[1] in tokens:
            out[pos[0]] = IS_NAN
            lse[pos[0]] = IS_NAN
    elif where == "w_uk":
        out[:, :, pos[0]] = IS_NAN
        lse[:, pos[0]] = IS_NAN
    else:
        out[:, :, pos[0], pos[2]] = IS_NAN
    return out, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["lowrank_decompress", "lowrank_cached_attention"])
def test_nan_inf_lowrank(op, backend):
    """Class 3: a NaN in q, a latent, a positional key or a weight (±Inf in q): every output
    that reads it is NaN, every other is bitwise unchanged, an empty union gives 0 / -inf."""
    examples(backend, 8, 5, lambda data: _nan_inf_lowrank(op, backend, data))


def _nan_inf_lowrank(op, backend, data):
    drawn = draw_poisoned_case(op, backend, data, kinds=lambda where: KINDS if where == "q" else ["nan"])
    if drawn is None:
        return
    dtype, kw, names, _, where, pos, kind = drawn
    clean = as_tuple(run(backend, op, **plain(kw, names)))
    poisoned = plain(kw, names)
    poisoned[where][pos] = poison_value(kind)
    codes = lowrank_codes(op, poisoned, where, pos, kind)
    oracle = as_tuple(run("reference", op, **plain(poisoned, names, torch.float64)))
    eager = as_tuple(run("reference", op, **plain(poisoned, names)))
    got = as_tuple(run(backend, op, **plain(poisoned, names)))
    COUNTS[3] += 1
    what = f"{op} on {backend} ({dtype}, strategy {kw.get('strategy')}), {kind} in {where}{list(pos)}"
    for i, code in enumerate(codes):
        check_pattern(got[i], clean[i], code, oracle[i], eager[i], f"{what}: output {i}")
    if op == "lowrank_cached_attention" and not any(e > s for s, e in kw["kv_ranges"]):
        assert bool((got[0] == 0).all()) and bool((got[1] == -math.inf).all()), (
            f"{what}: an empty union must give 0 and lse = -inf")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["rope3d", "rope3d_shift_", "rope3d_store_"])
def test_nan_inf_rope(op, backend):
    """Class 3: a NaN or ±Inf in x / a pool / k / v: the rotated pair holding it is non-finite
    (NaN for NaN; the reference's NaN/Inf pattern), an element copied holds the poison, and every
    other element is bitwise what it is without the poison."""
    examples(backend, 6, 4, lambda data: _nan_inf_rope(op, backend, data))


def _nan_inf_rope(op, backend, data):
    drawn = draw_poisoned_case(op, backend, data)
    if drawn is None:
        return
    dtype, kw, names, inplace, where, pos, kind = drawn
    val = poison_value(kind)
    clean = outputs(op, backend, plain(kw, names), inplace)
    poisoned = plain(kw, names)
    poisoned[where][pos] = val
    ref = outputs(op, "reference", plain(poisoned, names), inplace)
    got = outputs(op, backend, plain(poisoned, names), inplace)
    COUNTS[3] += 1
    what = f"{op} on {backend} ({dtype}), {kind} in {where}{list(pos)}"
    D = kw["x" if op == "rope3d" else "k_pool"].shape[3]
    c_t = rope_bands(D)[0]
    rotated = IS_NAN if kind == "nan" else NON_FINITE
    # Which output element(s) the poison reaches, and how.
    codes = [torch.full(o.shape, SAME) for o in got]
    if op == "rope3d":
        b, i, h, d = pos
        codes[0][b, i, h, d & ~1:(d & ~1) + 2] = rotated
    elif op == "rope3d_shift_":
        b, j, h, d = pos
        inside = any(s <= j < e for s, e in kw["ranges"])
        if inside and d < 2 * c_t:
            codes[0][b, j, h, d & ~1:(d & ~1) + 2] = rotated
        else:
            codes[0][b, j, h, d] = {"nan": IS_NAN, "+inf": POS_INF, "-inf": NEG_INF}[kind]
    else:
        F, hh, ww = kw["grid"]
        hw = hh * ww
        written = torch.zeros(kw["k_pool"].shape[1], dtype=torch.bool)
        for s in kw["frame_slots"]:
            written[s:s + hw] = True
        b, j, h, d = pos
        exact = {"nan": IS_NAN, "+inf": POS_INF, "-inf": NEG_INF}[kind]
        if where in ("k", "v"):
            dst = kw["frame_slots"][j // hw] + j % hw
            if where == "k":
                codes[0][b, dst, h, d & ~1:(d & ~1) + 2] = rotated
            else:
                codes[1][b, dst, h, d] = exact
        elif not bool(written[j]):  # a pool element the store does not write keeps the poison
            codes[0 if where == "k_pool" else 1][b, j, h, d] = exact
    for n, (g_, c_, code, r_) in enumerate(zip(got, clean, codes, ref)):
        check_pattern(g_, c_, code, None, None, f"{what}: output {n}")
        # Across backends: the reference's NaN / +inf / -inf pattern exactly.
        for pred in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(pred(g_), pred(r_)), (
                f"{what}: {pred.__name__} pattern differs from the reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_select_blocks(backend):
    """Class 3: NaN keys (or a NaN query): a block whose score reads a NaN ranks above every
    number, NaN blocks among themselves by index; a NaN nothing reads changes nothing."""
    examples(backend, 10, 6, lambda data: _nan_select_blocks(backend, data))


def _nan_select_blocks(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    require(backend, "select_blocks", "cpu", dtype)
    kw, names, _ = draw_case("select_blocks", data, backend, dtype)
    q, kp = kw["q"], kw["k_pool"]
    H, Hkv = q.shape[2], kp.shape[2]
    heads = kw["heads"] if kw["heads"] is not None else list(range(max(1, H // 2)))
    used_kv = {h // (H // Hkv) for h in heads}
    blocks = kw["block_ranges"]
    n_poison = data.draw(st.integers(1, 3), label="n_poison")
    poisoned = plain(kw, names)
    nan_blocks = set()
    for _ in range(n_poison):
        where = data.draw(st.sampled_from(["k_pool", "k_pool", "q"]), label="where")
        t = poisoned[where]
        pos = tuple(data.draw(st.integers(0, s - 1), label="pos") for s in t.shape)
        t[pos] = NAN
        if where == "k_pool" and pos[2] in used_kv:
            nan_blocks |= {m for m, (s, e) in enumerate(blocks) if s <= pos[1] < e}
        if where == "q" and pos[1] % kw["query_stride"] == 0 and pos[2] in heads:
            nan_blocks |= {m for m, (s, e) in enumerate(blocks) if e > s}
    scores = reference.block_scores(kw["q"].double(), kw["k_pool"].double(), blocks,
                                    query_stride=kw["query_stride"], heads=kw["heads"], score=kw["score"])
    got = run(backend, "select_blocks", **poisoned)
    COUNTS[3] += 1
    assert_picks(got, scores, kw["k"], nan_blocks,
                 what=f"select_blocks on {backend} ({dtype}, {kw['score']}), NaN blocks {sorted(nan_blocks)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["mean", "max"])
def test_nan_select_blocks_ties(backend, score):
    """Class 3: NaN keys in blocks 1 and 3 of 5: for every k the NaN blocks come first, the
    smaller index first, then the highest scores; every backend picks the same blocks."""
    require(backend, "select_blocks", "cpu", torch.float32)
    g = torch.Generator().manual_seed(7)
    q, kp = torch.randn(1, 8, 2, 8, generator=g), torch.randn(1, 20, 1, 8, generator=g)
    blocks = [[0, 4], [4, 8], [8, 12], [12, 16], [16, 20]]
    scores = reference.block_scores(q.double(), kp.double(), blocks, query_stride=2, score=score)
    kp[0, 5, 0, 3] = NAN
    kp[0, 14, 0, 0] = NAN
    for k in range(6):
        got = run(backend, "select_blocks", q=q, k_pool=kp, block_ranges=blocks, k=k, query_stride=2,
                  score=score)
        COUNTS[3] += 1
        assert_picks(got, scores, k, {1, 3}, what=f"select_blocks {score} k={k} on {backend}")


# ----------------------------------------------------------------------------- class 4: extremes

# (name, dtype, gain of q and of k: logits grow by gain**2, aligned: some keys equal to queries so
# that q . k in the input dtype would overflow float16, the ops it applies to). The low-rank op
# forms its keys from two factors: at logits far past x100 its 2x-eager bound is a coin toss of
# association order, so it runs the settings of issue #10 (float16 x100, bfloat16 x10 / x100).
ATTN = ("chunk_attention", "cached_attention")
ALL3 = ATTN + ("lowrank_cached_attention",)
LARGE = [("f16-logits-x100", torch.float16, 10.0, False, ALL3),
         ("f16-raw-dot-overflows", torch.float16, 48.0, True, ATTN),
         ("bf16-logits-x10", torch.bfloat16, 10.0**0.5, False, ALL3),
         ("bf16-logits-x100", torch.bfloat16, 10.0, True, ALL3),
         ("f32-logits-x1000", torch.float32, 1000.0**0.5, True, ATTN)]
LARGE_CASES = [pytest.param(op, *c[:4], id=f"{op}-{c[0]}") for c in LARGE for op in c[4]]


def _large_case(op, dtype, gain, aligned, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, k=1.0):
        return torch.randn(*s, generator=g) * k

    B, H, Hkv, D = 2, 4, 2, 32
    if op == "lowrank_cached_attention":
        d_c, d_nope, d_r, P = 24, 24, 8, 40
        c = r(B, P, d_c)
        w_uk = r(H, d_c, d_nope, k=gain * d_c**-0.5)
        q = r(B, 12, H, d_nope + d_r, k=gain)
        kr = r(B, P, d_r, k=gain)
        kw = dict(q=q, c_pool=c, w_uk=w_uk, w_uv=r(H, d_c, 16), kv_ranges=[[30, 40], [0, 21]], k_r_pool=kr,
                  return_lse=True)
        return {n: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}, (
            "q", "c_pool", "w_uk", "w_uv", "k_r_pool")
    L = 48
    q, k, v = r(B, L, H, D, k=gain), r(B, L, Hkv, D, k=gain), r(B, L, Hkv, D)
    if aligned:  # keys equal to queries: q . k = gain^2 * D, past float16's 65504 for gain 48
        k[:, 5:10] = q[:, 5:10, ::2]
        k[:, 40:44] = q[:, 20:24, 1::2]
    if op == "chunk_attention":
        kw = dict(q=q, k=k, v=v, frame_tokens=4, chunk_frames=3, sink_frames=1, window_frames=6,
                  return_lse=True)
        names = ("q", "k", "v")
    else:
        kw = dict(q=q[:, 20:36], k_pool=k, v_pool=v, kv_ranges=[[40, 48], [0, 24]], return_lse=True)
        names = ("q", "k_pool", "v_pool")
    return {n: (t.to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}, names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,name,dtype,gain,aligned", LARGE_CASES)
def test_large_logits(op, name, dtype, gain, aligned, backend):
    """Class 4: logits far beyond float16's range of exp: every backend within the flash-attn
    rule of the float64 oracle, where eager (the reference in the same dtype) must not overflow."""
    require(backend, op, "cpu", dtype)
    kw, names = _large_case(op, dtype, gain, aligned)
    oracle = run("reference", op, **plain(kw, names, torch.float64))
    eager = run("reference", op, **plain(kw, names))
    assert bool(torch.isfinite(eager[0]).all()) and bool(torch.isfinite(eager[1]).all()), (
        f"{name}: the reference overflows (max |out - oracle| = {max_err(eager[0], oracle[0]):.3g})")
    strategies = [None]
    if op == "lowrank_cached_attention" and backend != "reference":
        strategies = [None, "decompress", "absorb"] + (["tiled"] if backend == "cpu" else [])
    for s in strategies:
        extra = {} if s is None else {"strategy": s}
        got = run(backend, op, **plain(kw, names), **extra)
        COUNTS[4] += 1
        what = f"{op} {name} on {backend}" + (f" strategy {s}" if s else "")
        assert_close_to_oracle(got[0], oracle[0], eager[0], what=what + " out")
        assert_close_to_oracle(got[1], oracle[1], eager[1], what=what + " lse")


EXTREME_POSITIONS = [0.5, -0.25, 1e6 + 0.5, -1e7, 2**31 + 0.5, -(2**31) - 1.0, 123456.789, 2**40 + 0.5,
                     -1e12, 1e15, 2**53, -(2**62)]


def _positions():
    return st.one_of(st.sampled_from(EXTREME_POSITIONS), st.floats(-1e7, 1e7, allow_nan=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["rope3d", "rope3d_shift_", "rope3d_store_"])
def test_rope_extreme_positions(op, backend):
    """Class 4: very large, negative and fractional RoPE positions. Angles are formed in float64
    (docs/spec.md §3): up to |pos| = 1e7 the flash-attn rule holds against the float64 oracle;
    beyond, an angle itself carries |pos| * 2**-52 of rounding, which is allowed on top."""
    examples(backend, 6, 4, lambda data: _rope_extreme_positions(op, backend, data))


def _rope_extreme_positions(op, backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    require(backend, op, "cpu", dtype)
    kw, names, inplace = draw_case(op, data, backend, dtype)
    if op == "rope3d":
        kw["frame_offset"] = data.draw(_positions(), label="offset")
        pos = [kw["frame_offset"]]
    elif op == "rope3d_shift_":
        kw["delta_frames"] = [data.draw(_positions(), label="delta") for _ in kw["ranges"]]
        pos = kw["delta_frames"]
    else:
        kw["frame_pos"] = [data.draw(_positions(), label="pos") for _ in kw["frame_slots"]]
        pos = kw["frame_pos"]
    oracle = outputs(op, "reference", plain(kw, names, torch.float64), inplace)
    eager = outputs(op, "reference", plain(kw, names), inplace)
    got = outputs(op, backend, plain(kw, names), inplace)
    COUNTS[4] += 1
    big = max([abs(p) for p in pos] + [0.0])
    what = f"{op} on {backend} ({dtype}) at positions {pos}"
    for i, (g_, o, e) in enumerate(zip(got, oracle, eager)):
        assert bool(torch.isfinite(g_).all()), f"{what}: non-finite output"
        if big <= 1e7:
            assert_close_to_oracle(g_, o, e, what=f"{what} output {i}")
        else:
            top = float(o.abs().max()) if o.numel() else 0.0
            slack = 8 * 2.0**-52 * big * top
            err, ref_err = max_err(g_, o), max_err(e, o)
            assert err <= 2 * ref_err + slack + 4 * torch.finfo(dtype).eps * top, (
                f"{what} output {i}: error {err:.3g} > 2 x eager {ref_err:.3g} + angle rounding {slack:.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["rope3d", "rope3d_shift_", "rope3d_store_"])
def test_rope_fixed_extreme_positions(op, backend):
    """Class 4: the extreme positions of the table on every RoPE op: a half frame past a million,
    minus ten million, past 2**31 and 2**40."""
    require(backend, op, "cpu", torch.float32)
    for p in (1e6 + 0.5, -1e7, 2**31 + 0.5, -(2**31) - 1.0, 2**40 + 0.5, -1e12):
        g = torch.Generator().manual_seed(19)
        kw, names, inplace = _pool_layout_case(op, torch.float32) if op != "rope3d" else (
            dict(x=torch.randn(2, 12, 3, 12, generator=g), grid=(3, 2, 2)), ("x",), ())
        if op == "rope3d":
            kw["frame_offset"] = p
        elif op == "rope3d_shift_":
            kw["delta_frames"] = [p, -p, 0.5]
        else:
            kw["frame_pos"] = [p, p + 1.25]
        oracle = outputs(op, "reference", plain(kw, names, torch.float64), inplace)
        eager = outputs(op, "reference", plain(kw, names), inplace)
        got = outputs(op, backend, plain(kw, names), inplace)
        COUNTS[4] += 1
        for i, (g_, o, e) in enumerate(zip(got, oracle, eager)):
            top = float(o.abs().max())
            err, ref_err = max_err(g_, o), max_err(e, o)
            slack = 8 * 2.0**-52 * abs(p) * top if abs(p) > 1e7 else 0.0
            floor = 2 * torch.finfo(g_.dtype).eps * top
            assert err <= 2 * ref_err + slack + floor, (
                f"{op} on {backend} at position {p}, output {i}: error {err:.3g} > 2 x eager {ref_err:.3g}"
                f" + angle rounding {slack:.3g} + {floor:.1g}")


# ----------------------------------------------------------------------------- classes 1, 2, 5: forked


@pytest.mark.parametrize("case_id", list(fuzz_case.CASES))
def test_isolated(case_id, _runner):
    """A case of tests/fuzz_case.py, run in a forked process (classes 1, 2 and 5): it must end
    normally with the expected exception or result."""
    results = _runner.wait()
    rec = results.get(case_id)
    if rec is None:
        pytest.fail(f"no result from tests/fuzz_case.py for this case; {'; '.join(_runner.problems)}",
                    pytrace=False)
    if rec["status"] == "skip":
        pytest.skip(rec["msg"])
    COUNTS[fuzz_case.CASES[case_id].cls] += rec.get("n", 1)
    if rec["status"] != "pass":
        pytest.fail(f"{rec['status']}: {rec['msg']}\n(reproduce: python tests/fuzz_case.py '{case_id}')",
                    pytrace=False)
