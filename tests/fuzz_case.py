"""The fuzz cases of tests/test_fuzz.py that run in a process of their own (docs/spec.md
Conventions; issue #10): bad inputs, integer overflow, index layouts and degenerate shapes, for
every public op on every backend that runs here.

    python tests/fuzz_case.py --list              # every case: id, class
    python tests/fuzz_case.py ID [ID ...]         # run these cases
    python tests/fuzz_case.py --shard 0/2         # run every other group of cases

The runner imports torch and vidstream once, then forks a child for the cases: a case that kills
its process (SIGFPE, SIGSEGV, heap corruption, a hang) is reported as such, and the cases after it
run in a fresh child. Cases where a crash is plausible (huge integers, wrapping indices, index
views reaching a kernel) get a child each; the others run in one child per op, backend and class.
One line per case on stdout: ``FUZZ {"id", "status": pass|fail|crash|timeout|skip, "msg", "n"}``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vidstream  # noqa: E402
from vidstream import testing  # noqa: E402

BACKENDS = ("reference", "cpu", "triton")
CLASSES = {
    1: "bad input (clear ValueError/TypeError naming the argument, nothing written)",
    2: "layouts (index dtypes/views/lists, strided and aliased tensors, degenerate shapes)",
    3: "NaN/Inf semantics (IEEE propagation, unread elements unaffected)",
    4: "numerical extremes (large logits in float16/bfloat16, extreme RoPE positions)",
    5: "crash-prone inputs, each in its own process (huge/wrapping integers, overflow)",
}
FUNCS = {op: getattr(vidstream, op) for op in (
    "rope3d", "rope3d_shift_", "rope3d_store_", "chunk_attention", "cached_attention",
    "select_blocks", "lowrank_decompress", "lowrank_cached_attention")}
INPLACE = {"rope3d_shift_": ("k_pool",), "rope3d_store_": ("k_pool", "v_pool")}
INDEX_ARG = {"rope3d_shift_": "ranges", "cached_attention": "kv_ranges",
             "select_blocks": "block_ranges", "lowrank_decompress": "kv_ranges",
             "lowrank_cached_attention": "kv_ranges"}
CASE_TIMEOUT_S = 30

E, T, VT = (ValueError,), (TypeError,), (ValueError, TypeError)
DROP = object()


class Fail(AssertionError):
    pass


# ----------------------------------------------------------------------------- inputs


def base(op: str, dtype=torch.float32, seed: int = 0) -> dict:
    """Valid keyword arguments of ``op`` (fresh tensors): the starting point of every case."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if op == "rope3d":
        return dict(x=r(1, 16, 2, 8), grid=(2, 2, 4), frame_offset=0.5)
    if op == "rope3d_shift_":
        return dict(k_pool=r(1, 20, 2, 8), ranges=[[0, 4], [8, 20]], delta_frames=[1.0, -2.5])
    if op == "rope3d_store_":
        return dict(k_pool=r(1, 20, 1, 8), v_pool=r(1, 20, 1, 6), k=r(1, 8, 1, 8), v=r(1, 8, 1, 6),
                    frame_slots=[0, 12], frame_pos=[3.0, 4.5], grid=(2, 2, 2))
    if op == "chunk_attention":
        return dict(q=r(1, 16, 2, 8), k=r(1, 16, 1, 8), v=r(1, 16, 1, 6), frame_tokens=4,
                    chunk_frames=2, sink_frames=1, return_lse=True)
    if op == "cached_attention":
        return dict(q=r(1, 5, 2, 8), k_pool=r(1, 20, 1, 8), v_pool=r(1, 20, 1, 6),
                    kv_ranges=[[0, 4], [8, 20]], return_lse=True)
    if op == "select_blocks":
        return dict(q=r(1, 9, 2, 8), k_pool=r(1, 20, 1, 8), block_ranges=[[0, 5], [5, 10], [12, 20]],
                    k=2, query_stride=2)
    if op == "lowrank_decompress":
        return dict(c_pool=r(1, 20, 6), w_uk=r(2, 6, 4), w_uv=r(2, 6, 5), kv_ranges=[[0, 4], [8, 20]],
                    k_r_pool=r(1, 20, 4))
    if op == "lowrank_cached_attention":
        return dict(q=r(1, 5, 2, 8), c_pool=r(1, 20, 6), w_uk=r(2, 6, 4), w_uv=r(2, 6, 5),
                    kv_ranges=[[0, 4], [8, 20]], k_r_pool=r(1, 20, 4), return_lse=True)
    raise KeyError(op)


def build(op: str, overrides: dict, dtype=torch.float32) -> dict:
    """``base(op)`` with ``overrides`` (a value, ``DROP``, or a function of the arguments so far)."""
    kw = base(op, dtype)
    for name, val in overrides.items():
        if callable(val):
            val = val(kw)
        if val is DROP:
            kw.pop(name, None)
        else:
            kw[name] = val
    return kw


def call(op: str, backend: str, kw: dict):
    with vidstream.use_backend(backend):
        return FUNCS[op](**kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of the whole buffer ``t`` lives in, as integers (NaN payloads compare too)."""
    b = t._base if t._base is not None else t
    b = b.detach().clone()
    if b.is_floating_point():
        b = b.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()])
    return b


def _names(err: BaseException, names) -> bool:
    return any(re.search(rf"\b{re.escape(n)}\b", str(err)) for n in names)


def _desc(exc) -> str:
    return " or ".join(e.__name__ for e in exc)


def expect_error(op: str, backend: str, kw: dict, exc, names):
    """The call raises ``exc`` naming one of ``names``, and the in-place outputs are unchanged."""
    outs = [(n, kw[n]) for n in INPLACE.get(op, ())
            if isinstance(kw.get(n), torch.Tensor) and kw[n].device.type == "cpu"]
    before = [bits(t) for _, t in outs]
    try:
        call(op, backend, kw)
    except Exception as e:  # noqa: BLE001 - any exception is judged below
        err = e
    else:
        raise Fail(f"accepted; expected {_desc(exc)} naming {'/'.join(names)}")
    msg = f"{type(err).__name__}: {str(err)[:400]}"
    if not isinstance(err, exc):
        raise Fail(f"raised {msg}; expected {_desc(exc)} naming {'/'.join(names)}")
    if not _names(err, names):
        raise Fail(f"message does not name {'/'.join(names)}: {msg}")
    for (n, t), b in zip(outs, before):
        if not torch.equal(bits(t), b):
            raise Fail(f"wrote into {n} before raising {msg}")


def same_result(got, want, what: str, exact: bool = False):
    """Outputs (a tensor, or a tuple of them) equal: bitwise with ``exact``, else to rounding."""
    if isinstance(want, torch.Tensor):
        got, want = (got,), (want,)
    if len(got) != len(want):
        raise Fail(f"{what}: {len(got)} outputs, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape or g.dtype != w.dtype:
            raise Fail(f"{what}: output {i} is {g.dtype} {tuple(g.shape)}, expected {w.dtype} "
                       f"{tuple(w.shape)}")
        if exact:
            if not torch.equal(bits(g.contiguous()), bits(w.contiguous())):
                d = (g.double() - w.double()).abs()
                raise Fail(f"{what}: output {i} differs (max |diff| {float(d.nan_to_num(1e30).max()):.3g})")
        else:
            try:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, equal_nan=True)
            except AssertionError as e:
                raise Fail(f"{what}: output {i}: {str(e)[:300]}") from None


def _results(op: str, backend: str, kw: dict):
    """What to compare of a call: its return value, and for in-place ops the pools."""
    out = call(op, backend, kw)
    if op in INPLACE:
        return tuple(kw[n].clone() for n in INPLACE[op])
    return out


# ----------------------------------------------------------------------------- the registry


@dataclass
class Case:
    id: str
    cls: int
    op: str
    backend: str
    fn: Callable[[], Optional[int]]
    group: Optional[str]  # None: a process of its own
    dtype: torch.dtype = torch.float32

    def why_not(self) -> Optional[str]:
        return testing.why_not(self.backend, self.op, "cpu", self.dtype)


CASES: dict[str, Case] = {}


def add(cls: int, op: str, label: str, fn, *, own: bool = False, backends=BACKENDS,
        dtype=torch.float32):
    for b in backends:
        cid = f"{op}/{b}/{label}"
        assert cid not in CASES, cid
        # The eager reference cannot crash the process: its "own process" cases share one.
        alone = own and b != "reference"
        CASES[cid] = Case(cid, cls, op, b, functools.partial(fn, b),
                          None if alone else f"{op}/{b}/c{cls}", dtype)


def bad(op: str, label: str, overrides: dict, exc, names, *, cls: int = 1, own: bool = False):
    names = (names,) if isinstance(names, str) else tuple(names)

    def fn(backend):
        expect_error(op, backend, build(op, overrides), exc, names)

    add(cls, op, label, fn, own=own)


def either(op: str, label: str, overrides: dict, clamped: dict, names, *, cls: int = 5,
           error_ok: bool = True):
    """A huge integer parameter: a ValueError naming it (if ``error_ok``), or the result of the
    same op with the parameter clamped to what the input can use."""
    names = (names,) if isinstance(names, str) else tuple(names)

    def fn(backend):
        kw = build(op, overrides)
        try:
            got = _results(op, backend, kw)
        except Exception as e:  # noqa: BLE001
            if error_ok and isinstance(e, ValueError) and _names(e, names):
                return
            raise Fail(f"raised {type(e).__name__}: {str(e)[:300]}; expected "
                       f"{'a ValueError naming ' + '/'.join(names) + ' or ' if error_ok else ''}"
                       f"the result with {clamped}") from None
        want = _results(op, backend, build(op, {**overrides, **clamped}))
        same_result(got, want, f"result vs {clamped}")
        if backend != "reference":
            ref = _results(op, "reference", build(op, {**overrides, **clamped}))
            same_result(want, ref, f"result with {clamped} vs the reference")

    add(cls, op, label, fn, own=True)


# ----------------------------------------------------------------------------- class 1 tables


def tensor_cases(op: str, name: str, *, first: bool = False, optional: bool = False):
    """A tensor argument of the wrong kind, rank, dtype or device."""
    bad(op, f"{name}=str", {name: "x"}, T, name)
    if not optional:
        bad(op, f"{name}=None", {name: None}, T, name)
    bad(op, f"{name}=nested-list", {name: lambda kw: kw[name].tolist()}, T, name)
    bad(op, f"{name}=numpy", {name: lambda kw: kw[name].numpy()}, T, name)
    bad(op, f"{name}.rank-1", {name: lambda kw: kw[name][0]}, E, name)
    bad(op, f"{name}.rank+1", {name: lambda kw: kw[name][None]}, E, name)
    bad(op, f"{name}.int32", {name: lambda kw: (kw[name] * 4).to(torch.int32)}, E, name)
    if not first:
        bad(op, f"{name}.float64", {name: lambda kw: kw[name].double()}, E, name)
        bad(op, f"{name}.float16", {name: lambda kw: kw[name].half()}, E, name)
        bad(op, f"{name}.meta", {name: lambda kw: kw[name].to("meta")}, E, name)


def int_cases(op: str, name: str, minimum: int, *, none_ok: bool = False):
    """An int parameter below its minimum, or not an int."""
    bad(op, f"{name}={minimum - 1}", {name: minimum - 1}, E, name)
    if minimum - 1 != -1:
        bad(op, f"{name}=-1", {name: -1}, E, name)
    bad(op, f"{name}=-2**63", {name: -2**63}, E, name)
    for label, v in (("2.0", 2.0), ("nan", math.nan), ("inf", math.inf), ("'2'", "2"),
                     ("True", True), ("[2]", [2])):
        bad(op, f"{name}={label}", {name: v}, T, name)
    if not none_ok:
        bad(op, f"{name}=None", {name: None}, T, name)


def scale_cases(op: str):
    for label, v in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
        bad(op, f"scale={label}", {"scale": v}, E, "scale")
    for label, v in (("'1'", "1"), ("True", True), ("[0.5]", [0.5])):
        bad(op, f"scale={label}", {"scale": v}, T, "scale")


def theta_cases(op: str, heads: int):
    for label, v in (("0", 0.0), ("-1", -1.0), ("nan", math.nan), ("inf", math.inf)):
        bad(op, f"theta={label}", {"theta": v}, E, "theta")
    for label, v in (("'1e4'", "1e4"), ("None", None), ("True", True)):
        bad(op, f"theta={label}", {"theta": v}, T, "theta")
    good = [1e4] * heads
    for label, v in (("shape[H+1]", torch.tensor(good + [1e4])),
                     ("shape[H,1]", torch.tensor(good)[:, None]),
                     ("int", torch.tensor(good).to(torch.int32)),
                     ("nan", torch.tensor(good[:-1] + [math.nan])),
                     ("inf", torch.tensor(good[:-1] + [math.inf])),
                     ("zero", torch.tensor(good[:-1] + [0.0])),
                     ("negative", torch.tensor(good[:-1] + [-5.0])),
                     ("meta", torch.tensor(good).to("meta"))):
        bad(op, f"t_theta={label}", {"t_theta": v}, E, "t_theta")
    for label, v in (("list", good), ("str", "x")):
        bad(op, f"t_theta={label}", {"t_theta": v}, T, "t_theta")


def position_cases(op: str, name: str, count: int, *, scalar_ok: bool):
    """delta_frames / frame_pos: finite numbers, one per range / frame."""
    ok = [1.0] * count
    vals = [("[nan]", ok[:-1] + [math.nan]), ("[inf]", ok[:-1] + [math.inf]),
            ("[-inf]", [-math.inf] + ok[1:]), ("tensor-nan", torch.tensor(ok[:-1] + [math.nan])),
            ("tensor-inf-f16", torch.tensor(ok[:-1] + [math.inf], dtype=torch.float16)),
            ("short", ok[:-1]), ("long", ok + [1.0]), ("2-D", torch.tensor(ok)[None]),
            ("meta", torch.tensor(ok).to("meta"))]
    if scalar_ok:
        vals += [("nan", math.nan), ("inf", math.inf)]
    for label, v in vals:
        bad(op, f"{name}={label}", {name: v}, E, name)
    for label, v in (("str", "1"), ("[1,'a']", ok[:-1] + ["a"]), ("True", True),
                     ("[True]", [True] * count), ("dict", {0: 1.0})):
        bad(op, f"{name}={label}", {name: v}, T, name)


def ranges_cases(op: str, name: str, pool: int = 20):
    """Token ranges: out of bounds, inverted, overlapping, wrapping, huge, of the wrong kind."""
    P = pool
    for label, v in (("oob-end", [[0, P + 1]]), ("neg-start", [[-1, 3]]), ("inverted", [[5, 3]]),
                     ("overlap", [[0, 6], [4, 10]]), ("overlap-reversed", [[4, 10], [0, 6]]),
                     ("overlap-hidden-by-empty", [[0, 6], [3, 3], [5, 8]]),
                     ("duplicate", [[2, 5], [2, 5]]), ("nested", [[0, 10], [2, 4]]),
                     ("empty-oob", [[P + 1, P + 1]]), ("empty-neg", [[-1, -1]]),
                     ("tensor-oob", torch.tensor([[0, P + 1]])),
                     ("tensor-overlap", torch.tensor([[0, 6], [4, 10]], dtype=torch.int32)),
                     ("uint8-oob", torch.tensor([[250, 255]], dtype=torch.uint8)),
                     ("int8-neg", torch.tensor([[-3, 4]], dtype=torch.int8)),
                     ("int16-oob", torch.tensor([[0, 300]], dtype=torch.int16)),
                     ("transposed-overlap", torch.tensor([[0, 6], [4, 10]]).t().contiguous().t()),
                     ("shape[2]", torch.tensor([0, 4])), ("shape[1,3]", torch.tensor([[0, 4, 8]])),
                     ("shape[1,2,2]", torch.tensor([[[0, 4], [5, 6]]])),
                     ("meta", torch.tensor([[0, 4]]).to("meta"))):
        bad(op, f"{name}={label}", {name: v}, E, name)
    for label, v in (("None", None), ("str", "0,4"), ("float", 3.0), ("int", 4),
                     ("float-entry", [[0, 4.0]]), ("bool-entry", [[True, 4]]), ("str-entry", [["0", 4]]),
                     ("none-entry", [[0, None]])):
        bad(op, f"{name}={label}", {name: v}, T, name)
    for label, v in (("float-tensor", torch.tensor([[0.0, 4.0]])),
                     ("bool-tensor", torch.tensor([[False, True]])),
                     ("triple", [[0, 1, 2]]), ("flat", [0, 4]), ("pair-of-ints", (0, 4))):
        bad(op, f"{name}={label}", {name: v}, VT, name)
    # Values past int32 / int64: each could wrap into bounds after a cast: a process each.
    for label, v in (("[0,2**31]", [[0, 2**31]]), ("[2**31-1]*2", [[2**31 - 1, 2**31 - 1]]),
                     ("[0,2**32+4]", [[0, 2**32 + 4]]), ("[2**32,2**32+4]", [[2**32, 2**32 + 4]]),
                     ("[-2**32+16,P]", [[-2**32 + 16, P]]), ("[0,2**63-1]", [[0, 2**63 - 1]]),
                     ("[0,2**63]", [[0, 2**63]]), ("[0,2**64]", [[0, 2**64]]),
                     ("[2**64+2,2**64+4]", [[2**64 + 2, 2**64 + 4]]), ("[-2**63,4]", [[-2**63, 4]]),
                     ("[-2**64,4]", [[-2**64, 4]]),
                     ("int64[2**32,2**32+4]", torch.tensor([[2**32, 2**32 + 4]])),
                     ("int64[-2**32+16,P]", torch.tensor([[-2**32 + 16, P]])),
                     ("int64[0,2**63-1]", torch.tensor([[0, 2**63 - 1]])),
                     ("int64[-2**63,0]", torch.tensor([[-2**63, 0]])),
                     ("int64-view[2**32]", torch.tensor([[0, 2**32 + 4], [9, 9]])[::2]),
                     ("int32[2**31-1]", torch.tensor([[2**31 - 1, 2**31 - 1]], dtype=torch.int32))):
        bad(op, f"{name}={label}", {name: v}, E, name, cls=5, own=True)


def slots_cases():
    """rope3d_store_'s frame_slots (F = 2 frames of h*w = 4 tokens, P = 20: slots 0..16)."""
    op, n = "rope3d_store_", "frame_slots"
    for label, v in (("oob", [0, 17]), ("neg", [-1, 8]), ("overlap", [0, 2]), ("duplicate", [4, 4]),
                     ("overlap-reversed", [16, 13]), ("past-end", [18, 0]), ("at-end", [0, 20]),
                     ("tensor-oob", torch.tensor([0, 17])),
                     ("uint8-oob", torch.tensor([4, 255], dtype=torch.uint8)),
                     ("int8-neg", torch.tensor([4, -8], dtype=torch.int8)),
                     ("int16-overlap", torch.tensor([4, 6], dtype=torch.int16)),
                     ("short", [0]), ("long", [0, 4, 8]), ("2-D", torch.tensor([[0, 8]])),
                     ("meta", torch.tensor([0, 8]).to("meta"))):
        bad(op, f"{n}={label}", {n: v}, E, n)
    for label, v in (("float-entries", [0.0, 8.0]), ("bool-entry", [True, 8]), ("str-entry", ["0", 8]),
                     ("None", None), ("str", "0 8"), ("none-entry", [0, None])):
        bad(op, f"{n}={label}", {n: v}, T, n)
    for label, v in (("float-tensor", torch.tensor([0.0, 8.0])),
                     ("bool-tensor", torch.tensor([False, True])), ("int", 8)):
        bad(op, f"{n}={label}", {n: v}, VT, n)
    for label, v in (("[4,2**31-1]", [4, 2**31 - 1]), ("[4,2**31-2]", [4, 2**31 - 2]),
                     ("[4,2**31]", [4, 2**31]), ("[2**32,12]", [2**32, 12]),
                     ("[-2**32+16,4]", [-2**32 + 16, 4]), ("[4,2**32+8]", [4, 2**32 + 8]),
                     ("[4,2**63-1]", [4, 2**63 - 1]), ("[4,2**63]", [4, 2**63]), ("[4,2**64]", [4, 2**64]),
                     ("[4,-2**63]", [4, -2**63]), ("[4,2**64+8]", [4, 2**64 + 8]),
                     ("int64[2**32,12]", torch.tensor([2**32, 12])),
                     ("int64[-2**32+16,4]", torch.tensor([-2**32 + 16, 4])),
                     ("int64[4,2**31-1]", torch.tensor([4, 2**31 - 1])),
                     ("int32[4,2**31-1]", torch.tensor([4, 2**31 - 1], dtype=torch.int32)),
                     ("int64-view[2**32]", torch.tensor([2**32 + 8, 0, 4, 0])[::2])):
        bad(op, f"{n}={label}", {n: v}, E, n, cls=5, own=True)


def grid_cases(op: str, tokens: int, good: tuple):
    for label, v in (("(2,2)", good[:2]), ("(1,1,1,L)", (1, 1, 1, tokens))):
        bad(op, f"grid={label}", {"grid": v}, VT, "grid")
    for label, v in (("float", (good[0], good[1], float(good[2]))),
                     ("bool", (True, good[1] * good[0], good[2])), ("None", None), ("str", "224"),
                     ("int", tokens), ("str-entries", tuple(map(str, good)))):
        bad(op, f"grid={label}", {"grid": v}, T, "grid")
    for label, v in (("mismatch", (good[0] + 1, good[1], good[2])),
                     ("negative", (-good[0], -good[1], good[2])),
                     ("zero-h", (good[0], 0, good[2])), ("zero-F", (0, good[1], good[2]))):
        bad(op, f"grid={label}", {"grid": v}, E, "grid")


# ----------------------------------------------------------------------------- per op


def _with(name, fn):
    """An override computed from the argument ``name`` of the base call."""
    return lambda kw: fn(kw[name])


def chunk_attention_cases():
    op = "chunk_attention"
    tensor_cases(op, "q", first=True)
    tensor_cases(op, "k")
    tensor_cases(op, "v")
    bad(op, "k.tokens", {"k": _with("k", lambda t: t[:, :12]), "v": _with("v", lambda t: t[:, :12])}, E, "k")
    bad(op, "v.tokens", {"v": _with("v", lambda t: t[:, :12])}, E, "v")
    bad(op, "k.head_dim", {"k": _with("k", lambda t: t[..., :6])}, E, "k")
    bad(op, "k.heads-not-divisor", {"k": _with("k", lambda t: t.expand(-1, -1, 3, -1).contiguous()),
                                    "v": _with("v", lambda t: t.expand(-1, -1, 3, -1).contiguous())}, E, "k")
    bad(op, "v.heads", {"v": _with("v", lambda t: t.expand(-1, -1, 2, -1).contiguous())}, E, "v")
    bad(op, "k.batch", {"k": _with("k", lambda t: t.expand(2, -1, -1, -1).contiguous())}, E, ("k", "batch"))
    bad(op, "q.head_dim=0", {"q": _with("q", lambda t: t[..., :0]), "k": _with("k", lambda t: t[..., :0])},
        E, "q")
    int_cases(op, "frame_tokens", 1)
    int_cases(op, "chunk_frames", 1)
    int_cases(op, "sink_frames", 0)
    int_cases(op, "window_frames", 1, none_ok=True)
    bad(op, "frame_tokens=3(L%3)", {"frame_tokens": 3}, E, "frame_tokens")
    bad(op, "frame_tokens=32>L", {"frame_tokens": 32}, E, "frame_tokens")
    bad(op, "window<chunk", {"window_frames": 1}, E, "window_frames")
    bad(op, "window<chunk(huge)", {"window_frames": 2**62, "chunk_frames": 2**63 - 1}, E,
        ("window_frames", "chunk_frames"),
        cls=5, own=True)
    scale_cases(op)
    # int64 overflow of the products a kernel forms: a ValueError naming the argument, or the
    # result with the parameter clamped to the sequence (L = 16, 4 frames).
    for label, ov, cl, nm in (
            ("chunk_frames=2**62", {"chunk_frames": 2**62}, {"chunk_frames": 4}, "chunk_frames"),
            ("chunk_frames=2**63-1,ft=2", {"chunk_frames": 2**63 - 1, "frame_tokens": 2},
             {"chunk_frames": 8}, "chunk_frames"),
            ("chunk_frames=2**63", {"chunk_frames": 2**63}, {"chunk_frames": 4}, "chunk_frames"),
            ("chunk_frames=2**64", {"chunk_frames": 2**64}, {"chunk_frames": 4}, "chunk_frames"),
            ("chunk_frames=2**31", {"chunk_frames": 2**31}, {"chunk_frames": 4}, "chunk_frames"),
            ("chunk_frames=2**32+1", {"chunk_frames": 2**32 + 1}, {"chunk_frames": 4}, "chunk_frames"),
            ("sink_frames=2**62", {"sink_frames": 2**62, "window_frames": 2}, {"sink_frames": 4},
             "sink_frames"),
            ("sink_frames=2**63-1", {"sink_frames": 2**63 - 1, "window_frames": 2}, {"sink_frames": 4},
             "sink_frames"),
            ("sink_frames=2**32", {"sink_frames": 2**32, "window_frames": 2}, {"sink_frames": 4},
             "sink_frames"),
            ("window_frames=2**62", {"window_frames": 2**62}, {"window_frames": None}, "window_frames"),
            ("window_frames=2**63-1", {"window_frames": 2**63 - 1}, {"window_frames": None}, "window_frames"),
            ("window_frames=2**32+2", {"window_frames": 2**32 + 2}, {"window_frames": None}, "window_frames"),
            ("window_frames=2**64", {"window_frames": 2**64}, {"window_frames": None}, "window_frames"),
            ("all-huge", {"chunk_frames": 2**62, "sink_frames": 2**62, "window_frames": 2**63 - 1},
             {"chunk_frames": 4, "sink_frames": 4, "window_frames": None},
             ("chunk_frames", "sink_frames", "window_frames"))):
        either(op, label, ov, cl, nm)
    empty = {n: _with(n, lambda t: t[:, :0]) for n in ("q", "k", "v")}
    for label, ft in (("2**62", 2**62), ("2**63-1", 2**63 - 1), ("2**64", 2**64), ("2**31", 2**31),
                      ("2**32+4", 2**32 + 4)):
        either(op, f"L=0,frame_tokens={label}", {**empty, "frame_tokens": ft}, {"frame_tokens": 4},
               "frame_tokens")
    either(op, "L=0,frame_tokens=2**62,chunk_frames=2**62",
           {**empty, "frame_tokens": 2**62, "chunk_frames": 2**62}, {"frame_tokens": 4, "chunk_frames": 2},
           ("frame_tokens", "chunk_frames"))
    bad(op, "frame_tokens=2**62(L%)", {"frame_tokens": 2**62}, E, "frame_tokens", cls=5, own=True)
    bad(op, "frame_tokens=2**32+4(L%)", {"frame_tokens": 2**32 + 4}, E, "frame_tokens", cls=5, own=True)


def cached_attention_cases():
    op = "cached_attention"
    tensor_cases(op, "q", first=True)
    tensor_cases(op, "k_pool")
    tensor_cases(op, "v_pool")
    bad(op, "v_pool.tokens", {"v_pool": _with("v_pool", lambda t: t[:, :18])}, E, "v_pool")
    bad(op, "k_pool.head_dim", {"k_pool": _with("k_pool", lambda t: t[..., :6])}, E, "k_pool")
    bad(op, "k_pool.heads-not-divisor",
        {"k_pool": _with("k_pool", lambda t: t.expand(-1, -1, 3, -1).contiguous()),
         "v_pool": _with("v_pool", lambda t: t.expand(-1, -1, 3, -1).contiguous())}, E, "k_pool")
    bad(op, "v_pool.heads", {"v_pool": _with("v_pool", lambda t: t.expand(-1, -1, 2, -1).contiguous())},
        E, "v_pool")
    bad(op, "q.batch", {"q": _with("q", lambda t: t.expand(2, -1, -1, -1).contiguous())}, E,
        ("k_pool", "batch", "q"))
    ranges_cases(op, "kv_ranges")
    scale_cases(op)


def rope3d_cases():
    op = "rope3d"
    tensor_cases(op, "x", first=True)
    bad(op, "x.odd-D", {"x": _with("x", lambda t: t[..., :7])}, E, "x")
    bad(op, "x.D=0", {"x": _with("x", lambda t: t[..., :0])}, E, "x")
    grid_cases(op, 16, (2, 2, 4))
    for label, v in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
        bad(op, f"frame_offset={label}", {"frame_offset": v}, E, "frame_offset")
    for label, v in (("'0'", "0"), ("None", None), ("True", True), ("[0.0]", [0.0])):
        bad(op, f"frame_offset={label}", {"frame_offset": v}, T, "frame_offset")
    theta_cases(op, 2)
    # h*w overflows int64 though F*h*w == L == 0.
    for label, g in (("(0,2**62,2**62)", (0, 2**62, 2**62)), ("(0,2**32,2**32)", (0, 2**32, 2**32)),
                     ("(0,2**63,1)", (0, 2**63, 1))):
        bad(op, f"L=0,grid={label}", {"x": _with("x", lambda t: t[:, :0]), "grid": g}, E, "grid",
            cls=5, own=True)
    for label, g in (("(1,2**32+2,8)", (1, 2**32 + 2, 8)), ("(2**62,4,4)", (2**62, 4, 4)),
                     ("(2**64+1,4,4)", (2**64 + 1, 4, 4))):
        bad(op, f"grid={label}", {"grid": g}, E, "grid", cls=5, own=True)
    either(op, "L=0,grid=(0,2**31,1)", {"x": _with("x", lambda t: t[:, :0]), "grid": (0, 2**31, 1)},
           {"grid": (0, 1, 1)}, "grid", error_ok=False)


def rope3d_shift_cases():
    op = "rope3d_shift_"
    tensor_cases(op, "k_pool", first=True)
    bad(op, "k_pool.odd-D", {"k_pool": _with("k_pool", lambda t: t[..., :7])}, E, "k_pool")
    ranges_cases(op, "ranges")
    position_cases(op, "delta_frames", 2, scalar_ok=True)
    bad(op, "delta_frames=None", {"delta_frames": None}, T, "delta_frames")
    theta_cases(op, 2)


def rope3d_store_cases():
    op = "rope3d_store_"
    tensor_cases(op, "k_pool", first=True)
    tensor_cases(op, "v_pool")
    tensor_cases(op, "k")
    tensor_cases(op, "v")
    bad(op, "k.heads", {"k": _with("k", lambda t: t.expand(-1, -1, 2, -1).contiguous())}, E, "k")
    bad(op, "k.head_dim", {"k": _with("k", lambda t: t[..., :6])}, E, "k")
    bad(op, "v.head_dim", {"v": _with("v", lambda t: t[..., :4])}, E, "v")
    bad(op, "v.tokens", {"v": _with("v", lambda t: t[:, :4])}, E, "v")
    bad(op, "v_pool.tokens", {"v_pool": _with("v_pool", lambda t: t[:, :18].clone())}, E, "v_pool")
    bad(op, "v_pool.heads", {"v_pool": _with("v_pool", lambda t: t.expand(-1, -1, 2, -1).contiguous())},
        E, "v_pool")
    bad(op, "k.batch", {"k": _with("k", lambda t: t.expand(2, -1, -1, -1).contiguous())}, E, ("k", "batch"))
    grid_cases(op, 8, (2, 2, 2))
    bad(op, "grid=(1,2,4)-vs-2-slots", {"grid": (1, 2, 4)}, E, ("frame_slots", "grid"))
    slots_cases()
    position_cases(op, "frame_pos", 2, scalar_ok=False)
    bad(op, "frame_pos=None", {"frame_pos": None}, VT, "frame_pos")
    bad(op, "frame_pos-missing", {"frame_pos": DROP}, VT, "frame_pos")
    theta_cases(op, 1)
    for label, g in (("(0,2**62,2**62)", (0, 2**62, 2**62)), ("(0,2**32,2**32)", (0, 2**32, 2**32))):
        bad(op, f"F=0,grid={label}", {"k": _with("k", lambda t: t[:, :0]),
                                      "v": _with("v", lambda t: t[:, :0]),
                                      "frame_slots": [], "frame_pos": [], "grid": g}, E, "grid",
            cls=5, own=True)


def select_blocks_cases():
    op = "select_blocks"
    tensor_cases(op, "q", first=True)
    tensor_cases(op, "k_pool")
    bad(op, "k_pool.head_dim", {"k_pool": _with("k_pool", lambda t: t[..., :6])}, E, "k_pool")
    bad(op, "k_pool.batch", {"k_pool": _with("k_pool", lambda t: t.expand(2, -1, -1, -1).contiguous())},
        E, ("k_pool", "batch"))
    bad(op, "k_pool.heads-not-divisor",
        {"k_pool": _with("k_pool", lambda t: t.expand(-1, -1, 3, -1).contiguous())}, E, "k_pool")
    bad(op, "q.Lq=0", {"q": _with("q", lambda t: t[:, :0])}, E, "q")
    ranges_cases(op, "block_ranges")
    int_cases(op, "k", 0)
    int_cases(op, "query_stride", 1)
    for label, v in (("[]", []), ("[0,0]", [0, 0]), ("[H]", [2]), ("[-1]", [-1]), ("[2**32]", [2**32]),
                     ("[2**64]", [2**64])):
        bad(op, f"heads={label}", {"heads": v}, E, "heads")
    for label, v in (("1", 1), ("0", 0), ("[0.0]", [0.0]), ("[True]", [True]), ("'0'", "0"),
                     ("[None]", [None])):
        bad(op, f"heads={label}", {"heads": v}, T, "heads")
    bad(op, "score='bogus'", {"score": "bogus"}, E, "score")
    bad(op, "score='MEAN'", {"score": "MEAN"}, E, "score")
    for label, v in (("None", None), ("1", 1)):
        bad(op, f"score={label}", {"score": v}, VT, "score")
    scale_cases(op)
    # Huge k / query_stride are valid: all blocks / only query 0 sampled (Lq = 9).
    for label, v in (("2**31", 2**31), ("2**32+1", 2**32 + 1), ("2**62", 2**62), ("2**63-1", 2**63 - 1)):
        either(op, f"k={label}", {"k": v}, {"k": 3}, "k", error_ok=False)
        either(op, f"query_stride={label}", {"query_stride": v}, {"query_stride": 9}, "query_stride",
               error_ok=False)
    for label, v in (("2**63", 2**63), ("2**64", 2**64)):
        either(op, f"k={label}", {"k": v}, {"k": 3}, "k")
        either(op, f"query_stride={label}", {"query_stride": v}, {"query_stride": 9}, "query_stride")


def lowrank_cases(op: str):
    attn = op == "lowrank_cached_attention"
    if attn:
        tensor_cases(op, "q")
        bad(op, "q.heads", {"q": _with("q", lambda t: torch.cat([t, t[:, :, :1]], 2))}, E, "q")
        bad(op, "q.head_dim", {"q": _with("q", lambda t: t[..., :7])}, E, "q")
        bad(op, "q.head_dim-without-k_r", {"k_r_pool": None}, E, "q")
        bad(op, "q.batch", {"q": _with("q", lambda t: t.expand(2, -1, -1, -1).contiguous())}, E, "q")
        scale_cases(op)
        bad(op, "strategy='bogus'", {"strategy": "bogus"}, E, "strategy")
        bad(op, "strategy=1", {"strategy": 1}, VT, "strategy")
    tensor_cases(op, "c_pool", first=True)
    tensor_cases(op, "w_uk")
    tensor_cases(op, "w_uv")
    tensor_cases(op, "k_r_pool", optional=True)
    bad(op, "w_uk.d_c", {"w_uk": _with("w_uk", lambda t: t[:, :5])}, E, "w_uk")
    bad(op, "w_uv.heads", {"w_uv": _with("w_uv", lambda t: torch.cat([t, t[:1]]))}, E, "w_uv")
    bad(op, "w_uv.d_c", {"w_uv": _with("w_uv", lambda t: t[:, :5])}, E, "w_uv")
    bad(op, "k_r_pool.tokens", {"k_r_pool": _with("k_r_pool", lambda t: t[:, :18])}, E, "k_r_pool")
    bad(op, "k_r_pool.batch", {"k_r_pool": _with("k_r_pool", lambda t: t.expand(2, -1, -1).contiguous())},
        E, "k_r_pool")
    ranges_cases(op, "kv_ranges")


chunk_attention_cases()
cached_attention_cases()
rope3d_cases()
rope3d_shift_cases()
rope3d_store_cases()
select_blocks_cases()
lowrank_cases("lowrank_decompress")
lowrank_cases("lowrank_cached_attention")


# ----------------------------------------------------------------------------- class 2: index layouts


def index_variants(pairs, one_d: bool = False):
    """The same index values as lists, tuples, every integer dtype and several tensor views. The
    views hide out-of-bounds junk next to the values, so a kernel that reads the storage as if it
    were contiguous goes wrong loudly."""
    t = torch.tensor(pairs, dtype=torch.int64)
    junk = torch.full_like(t, 10**6)
    out = [("list", list(pairs)), ("tuple", tuple(tuple(p) if not one_d else p for p in pairs))]
    if not one_d:
        out.append(("list-of-tuples", [tuple(p) for p in pairs]))
    out += [(f"tensor-{str(dt)[6:]}", t.to(dt)) for dt in
            (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)]
    n = t.shape[0]
    if one_d:
        out += [("view[::2]", torch.stack([t, junk], 1).reshape(-1)[::2]),
                ("int32-view[::2]", torch.stack([t, junk], 1).to(torch.int32).reshape(-1)[::2]),
                ("view[1::3]", torch.stack([junk, t, junk], 1).reshape(-1)[1::3]),
                ("column-of-2D", torch.stack([t, junk], 1)[:, 0]),
                ("int16-column", torch.stack([t, junk], 1).to(torch.int16)[:, 0]),
                ("offset-view", torch.cat([junk, t])[n:])]
    else:
        out += [("transposed", t.t().contiguous().t()),
                ("int32-transposed", t.to(torch.int32).t().contiguous().t()),
                ("int8-transposed", t.to(torch.int8).t().contiguous().t()),
                ("rows[::2]", torch.stack([t, junk], 1).reshape(2 * n, 2)[::2]),
                ("int32-rows[::2]", torch.stack([t, junk], 1).reshape(2 * n, 2).to(torch.int32)[::2]),
                ("cols[:,::2]", torch.stack([t, junk], 2).reshape(n, 4)[:, ::2]),
                ("offset-view", torch.cat([junk, t])[n:])]
    return out


LAYOUT_PAIRS = [[8, 20], [0, 4], [5, 5], [4, 7]]  # out of order, an empty range, adjacent ranges


def _layout_base(op: str) -> dict:
    kw = base(op)
    if op in INDEX_ARG:
        kw[INDEX_ARG[op]] = LAYOUT_PAIRS
    if op == "rope3d_shift_":
        kw["delta_frames"] = [1.5, -2.0, 7.0, 0.25]
    if op == "select_blocks":
        kw["k"] = 2
    return kw


# The Triton interpreter is slow: on it, the layouts that matter (views, small dtypes).
TRITON_LAYOUTS = ("tuple", "tensor-int16", "tensor-uint8", "transposed", "int8-transposed", "rows[::2]",
                  "cols[:,::2]", "offset-view")


def index_layout_case(op: str, backend: str):
    """Every index layout gives bitwise the result of the plain list on this backend, and that
    result agrees with the reference."""
    arg = INDEX_ARG[op]
    want = _results(op, backend, _layout_base(op))
    ref = _results(op, "reference", _layout_base(op))
    same_result(want, ref, "list vs reference")
    n = 0
    for label, v in index_variants(LAYOUT_PAIRS):
        if backend == "triton" and label not in TRITON_LAYOUTS:
            continue
        kw = {**_layout_base(op), arg: v}
        before = v.clone() if isinstance(v, torch.Tensor) else None
        same_result(_results(op, backend, kw), want, f"{arg} as {label}", exact=True)
        if before is not None and not torch.equal(v, before):
            raise Fail(f"{arg} as {label} was modified")
        n += 1
    return n


for _op in INDEX_ARG:
    add(2, _op, "index-layouts", functools.partial(index_layout_case, _op),
        backends=("reference", "cpu"))
    add(2, _op, "index-layouts", functools.partial(index_layout_case, _op), backends=("triton",),
        own=True)


def _slots_base() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(k_pool=torch.randn(1, 28, 2, 8, generator=g), v_pool=torch.randn(1, 28, 2, 6, generator=g),
                k=torch.randn(1, 12, 2, 8, generator=g), v=torch.randn(1, 12, 2, 6, generator=g),
                frame_slots=[16, 0, 8], frame_pos=[2.0, 3.0, 4.5], grid=(3, 2, 2))


def slots_layout_case(label: str, backend: str):
    op = "rope3d_store_"
    want = _results(op, backend, _slots_base())
    same_result(want, _results(op, "reference", _slots_base()), "list vs reference")
    v = dict(index_variants([16, 0, 8], one_d=True))[label]
    got = _results(op, backend, {**_slots_base(), "frame_slots": v})
    same_result(got, want, f"frame_slots as {label}", exact=True)


for _label, _ in index_variants([16, 0, 8], one_d=True):
    # Triton once wrote out of bounds for non-contiguous slots: every layout in its own process.
    add(2, "rope3d_store_", f"frame_slots-layout-{_label}", functools.partial(slots_layout_case, _label),
        own=True)


# ----------------------------------------------------------------------------- class 2: degenerate shapes


def _valid(op: str, label: str, overrides: dict, check=None, *, own: bool = False):
    """Valid input: the backend agrees with the reference, and ``check(result)`` holds."""
    def fn(backend):
        got = _results(op, backend, build(op, overrides))
        if check is not None:
            check(got)
        if backend != "reference":
            same_result(got, _results(op, "reference", build(op, overrides)), "vs reference")

    add(2, op, label, fn, own=own)


def _empty_attention(res):
    out, lse = res
    if out.numel() and not bool((out == 0).all()):
        raise Fail("an empty allowed set must give zeros")
    if lse.numel() and not bool((lse == -math.inf).all()):
        raise Fail(f"an empty allowed set must give lse = -inf, got {lse.flatten()[:4].tolist()}")


def _shape(*shapes):
    def check(res):
        res = res if isinstance(res, tuple) else (res,)
        got = [tuple(r.shape) for r in res]
        if got != [tuple(s) for s in shapes]:
            raise Fail(f"shapes {got}, expected {list(shapes)}")
    return check


def _cut(name, fn):
    return {name: _with(name, fn)}


def degenerate_cases():
    L0 = lambda t: t[:, :0]  # noqa: E731
    B0 = lambda t: t[:0]  # noqa: E731
    op = "chunk_attention"
    _valid(op, "L=0", {n: _with(n, L0) for n in "qkv"}, _shape((1, 0, 2, 6), (1, 2, 0)))
    _valid(op, "B=0", {n: _with(n, B0) for n in "qkv"}, _shape((0, 16, 2, 6), (0, 2, 16)))
    _valid(op, "one-frame", {"frame_tokens": 16, "chunk_frames": 1, "window_frames": 1, "sink_frames": 0})
    _valid(op, "ft=1,cf=1,win=1", {"frame_tokens": 1, "chunk_frames": 1, "window_frames": 1,
                                   "sink_frames": 0})
    _valid(op, "D=1,Dv=1", {"q": _with("q", lambda t: t[..., :1]), "k": _with("k", lambda t: t[..., :1]),
                            "v": _with("v", lambda t: t[..., :1])})
    op = "cached_attention"
    _valid(op, "Lq=0", _cut("q", L0), _shape((1, 0, 2, 6), (1, 2, 0)))
    _valid(op, "R=0", {"kv_ranges": []}, _empty_attention)
    _valid(op, "R=0-tensor", {"kv_ranges": torch.zeros(0, 2, dtype=torch.int64)}, _empty_attention)
    _valid(op, "all-empty-ranges", {"kv_ranges": [[3, 3], [20, 20], [0, 0]]}, _empty_attention)
    _valid(op, "P=0", {"k_pool": _with("k_pool", L0), "v_pool": _with("v_pool", L0),
                       "kv_ranges": [[0, 0]]}, _empty_attention)
    _valid(op, "B=0", {n: _with(n, B0) for n in ("q", "k_pool", "v_pool")}, _shape((0, 5, 2, 6), (0, 2, 5)))
    _valid(op, "one-token", {"kv_ranges": [[19, 20]]})
    op = "rope3d"
    _valid(op, "L=0", {"x": _with("x", L0), "grid": (0, 2, 4)}, _shape((1, 0, 2, 8)))
    _valid(op, "B=0", _cut("x", B0), _shape((0, 16, 2, 8)))
    _valid(op, "D=2", {"x": _with("x", lambda t: t[..., :2])})
    _valid(op, "D=4,h=w=1", {"x": _with("x", lambda t: t[..., :4]), "grid": (16, 1, 1)})
    op = "rope3d_shift_"
    _valid(op, "R=0", {"ranges": [], "delta_frames": []})
    _valid(op, "R=0-scalar-delta", {"ranges": [], "delta_frames": 3.0})
    _valid(op, "empty-range", {"ranges": [[5, 5]], "delta_frames": [3.0]})
    _valid(op, "P=0", {"k_pool": _with("k_pool", L0), "ranges": [[0, 0]], "delta_frames": 1.0})
    _valid(op, "whole-pool", {"ranges": [[0, 20]], "delta_frames": -1.0})
    op = "rope3d_store_"
    _valid(op, "F=0", {"k": _with("k", L0), "v": _with("v", L0), "frame_slots": [], "frame_pos": [],
                       "grid": (0, 2, 2)})
    _valid(op, "last-slot", {"frame_slots": [16, 0]})
    op = "select_blocks"
    _valid(op, "M=0", {"block_ranges": []}, _shape((0,)))
    _valid(op, "k=0", {"k": 0}, _shape((0,)))
    _valid(op, "Lq=1", _cut("q", lambda t: t[:, :1]))
    _valid(op, "all-empty-mean", {"block_ranges": [[3, 3], [5, 5], [0, 0]], "score": "mean"}, _shape((2,)))
    _valid(op, "all-empty-max", {"block_ranges": [[3, 3], [5, 5], [0, 0]], "score": "max"}, _shape((2,)))
    _valid(op, "some-empty-max", {"block_ranges": [[3, 3], [5, 9], [0, 0], [10, 11]], "score": "max", "k": 3})
    _valid(op, "P=0", {"k_pool": _with("k_pool", L0), "block_ranges": [[0, 0]]}, _shape((1,)))
    for op in ("lowrank_decompress", "lowrank_cached_attention"):
        attn = op == "lowrank_cached_attention"
        empty = _empty_attention if attn else _shape((1, 0, 2, 8), (1, 0, 2, 5))
        _valid(op, "R=0", {"kv_ranges": []}, empty)
        _valid(op, "all-empty-ranges", {"kv_ranges": [[3, 3], [0, 0]]}, empty)
        no_c = {"c_pool": _with("c_pool", lambda t: t[..., :0]), "w_uk": _with("w_uk", lambda t: t[:, :0]),
                "w_uv": _with("w_uv", lambda t: t[:, :0])}
        q4 = {"q": _with("q", lambda t: t[..., :4])} if attn else {}
        _valid(op, "d_c=0", no_c)
        _valid(op, "k_r_pool=None", {"k_r_pool": None, **q4})
        _valid(op, "d_r=0", {"k_r_pool": _with("k_r_pool", lambda t: t[..., :0]), **q4})
        _valid(op, "P=0", {"c_pool": _with("c_pool", L0), "k_r_pool": _with("k_r_pool", L0),
                           "kv_ranges": [[0, 0]]}, empty)
        if attn:
            _valid(op, "Lq=0", _cut("q", L0), _shape((1, 0, 2, 5), (1, 2, 0)))
            for s in ("decompress", "absorb"):
                _valid(op, f"Lq=0,{s}", {"q": _with("q", L0), "strategy": s}, _shape((1, 0, 2, 5), (1, 2, 0)))
                _valid(op, f"R=0,{s}", {"kv_ranges": [], "strategy": s}, _empty_attention)
                _valid(op, f"d_c=0,{s}", {**no_c, "strategy": s})


degenerate_cases()


# ----------------------------------------------------------------------------- the runner


def run_case(c: Case) -> dict:
    t0 = time.perf_counter()
    res = {"id": c.id, "status": "pass", "msg": "", "n": 1}
    try:
        torch.manual_seed(0)
        n = c.fn()
        if isinstance(n, int):
            res["n"] = n
    except Exception as e:  # noqa: BLE001 - reported, not raised
        res.update(status="fail", msg=f"{type(e).__name__}: {e}"[:1500])
    res["s"] = round(time.perf_counter() - t0, 3)
    return res


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_group(cases: list, emit):
    """Runs ``cases`` in forked children, one after another in one child; a case that ends its
    child is reported with the signal or exit status, and the rest go on in a new child."""
    todo = [c for c in cases]
    while todo:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            out = os.fdopen(w, "w")
            code = 0
            try:
                for c in todo:
                    out.write(json.dumps({"id": c.id, "status": "start"}) + "\n")
                    out.flush()
                    signal.alarm(CASE_TIMEOUT_S)
                    out.write(json.dumps(run_case(c)) + "\n")
                    out.flush()
                    signal.alarm(0)
            except BaseException:  # noqa: BLE001
                code = 3
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            lines = f.read().splitlines()
        _, status = os.waitpid(pid, 0)
        done, started = set(), None
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec["status"] == "start":
                started = rec["id"]
            else:
                done.add(rec["id"])
                emit(rec)
                started = None
        if started is not None:
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                st = "timeout" if sig == signal.SIGALRM else "crash"
                how = f"after {CASE_TIMEOUT_S} s" if st == "timeout" else f"killed by {_signal_name(sig)}"
            else:
                st, how = "crash", f"exited with status {os.WEXITSTATUS(status)}"
            emit({"id": started, "status": st, "msg": f"the process died: {how}", "n": 1})
            done.add(started)
        elif len(done) < len(todo):  # died between cases
            nxt = next(c for c in todo if c.id not in done)
            emit({"id": nxt.id, "status": "crash", "msg": f"the process died (status {status})", "n": 1})
            done.add(nxt.id)
        todo = [c for c in todo if c.id not in done]


def groups(cases: list) -> list:
    """Cases grouped by ``Case.group`` (in order of first appearance); own-process cases alone."""
    out, index = [], {}
    for c in cases:
        if c.group is None:
            out.append([c])
        elif c.group in index:
            out[index[c.group]].append(c)
        else:
            index[c.group] = len(out)
            out.append([c])
    return out


def main(argv: list) -> int:
    if argv[:1] == ["--list"]:
        for c in CASES.values():
            print(f"{c.id}\t{c.cls}")
        return 0
    if argv[:1] == ["--shard"]:
        k, n = map(int, argv[1].split("/"))
        selected = [c for i, g in enumerate(groups(list(CASES.values()))) if i % n == k for c in g]
    else:
        unknown = [a for a in argv if a not in CASES]
        if unknown:
            print(f"unknown case ids: {unknown}", file=sys.stderr)
            return 2
        selected = [CASES[a] for a in argv]

    def emit(rec):
        print("FUZZ " + json.dumps(rec), flush=True)

    # Imported once here, not in every child: the Triton kernels' modules (no tensor op runs in
    # this process, so the children start without threads).
    if any(c.backend == "triton" for c in selected) and testing.why_not(
            "triton", "rope3d", "cpu", torch.float32) is None:
        import importlib

        for m in ("attention", "lowrank", "rope3d", "rope3d_store", "select_blocks"):
            importlib.import_module(f"vidstream.triton_kernels.{m}")

    runnable = []
    for c in selected:
        why = c.why_not()
        if why is not None:
            emit({"id": c.id, "status": "skip", "msg": why, "n": 0})
        else:
            runnable.append(c)
    for g in groups(runnable):
        run_group(g, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
