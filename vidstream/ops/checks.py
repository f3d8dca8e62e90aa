"""Input checks shared by the ops: the one place where user-facing ``ValueError``s are raised,
each naming the argument and the expected value. The public ops (and the checked reference
functions) call them once; kernels then trust their inputs, and the C++ ops keep only
memory-safety checks."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Callable, NoReturn, TypeVar

import torch

from .metadata import TokenRanges

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT64_MAX = 2**63 - 1


class ArgumentTypeError(TypeError, ValueError):
    """A wrong kind of argument. A ``TypeError``, and a ``ValueError`` too, as every bad input
    was before this distinction: ``except ValueError`` keeps catching it."""


def fail(msg: str) -> NoReturn:
    raise ValueError(msg)


def fail_type(msg: str) -> NoReturn:
    raise ArgumentTypeError(msg)


# ----------------------------------------------------------------------------- layout mistakes

_Check = TypeVar("_Check", bound=Callable)


def layout_hint(**layouts: str) -> Callable[[_Check], _Check]:
    """Decorates an op's input check whose tensor arguments ``layouts`` name (``q="[B, L, H, D]"``)
    so that a rejected call whose arguments would pass with dims 1 and 2 of some of them
    swapped, the common mistake of passing ``[B, H, L, D]`` tensors (PyTorch SDPA's layout),
    says so in its ``ValueError``: "q looks like [B, H, L, D]; vidstream takes [B, L, H, D]:
    pass q.transpose(1, 2)". Runs only when the check has failed; nothing changes otherwise."""

    def decorate(check: _Check) -> _Check:
        signature = inspect.signature(check)

        @functools.wraps(check)
        def checked(*args, **kwargs):
            if torch.compiler.is_compiling():
                return check(*args, **kwargs)
            try:
                return check(*args, **kwargs)
            except ArgumentTypeError:
                raise
            except ValueError as e:
                hint = _swapped_layout(check, signature, layouts, args, kwargs)
                if hint is None:
                    raise
                raise ValueError(f"{e}. {hint}") from None

        return checked  # type: ignore[return-value]

    return decorate


def _swapped_layout(check, signature, layouts, args, kwargs):
    """The hint naming the ``layouts`` tensors whose dims 1 and 2 swapped make ``check`` pass,
    or None. Where several sets would, the likeliest: the one after which the most tensors have
    at least as many tokens as heads, then the smallest."""
    given = signature.bind(*args, **kwargs).arguments

    def swappable(t) -> bool:  # a 4-D tensor that dims 1 and 2 swapped would change
        return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] != t.shape[2]

    names = [n for n in layouts if swappable(given.get(n))]
    best = None
    for subset in (c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)):
        trial = {n: t.transpose(1, 2) if n in subset else t for n, t in given.items()}
        bound = signature.bind(**trial)
        try:
            check(*bound.args, **bound.kwargs)
        except (ValueError, TypeError):
            continue
        plausible = sum(trial[n].shape[1] >= trial[n].shape[2] for n in names)
        if best is None or plausible > best[0]:
            best = (plausible, subset)
    if best is None:
        return None
    subset = best[1]
    dims = [d.strip() for d in layouts[subset[0]].strip("[]").split(",")]
    wrong = "[" + ", ".join([dims[0], dims[2], dims[1], *dims[3:]]) + "]"
    verb = "looks" if len(subset) == 1 else "look"
    return (f"{_and(subset)} {verb} like {wrong}; vidstream takes {layouts[subset[0]]}: pass "
            f"{_and(f'{n}.transpose(1, 2)' for n in subset)}")


def _and(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def tensor(t, name: str, ndim: int, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        fail_type(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        fail(f"{name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")


def floating(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        fail(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        fail(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        fail(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def positive_int(v, name: str, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        fail_type(f"{name} must be an int >= {minimum}, got {v!r}")
    if v < minimum:
        fail(f"{name} must be an int >= {minimum}, got {v!r}")
    if v > INT64_MAX:
        fail(f"{name} must fit in int64 (<= 2**63 - 1), got {v}")


def fits_int64(value: int, what: str) -> None:
    """Integer arithmetic a kernel does in int64 must not overflow: checked here, exactly, in
    Python's unbounded ints, before any kernel sees the operands."""
    if value > INT64_MAX:
        fail(f"{what} = {value} overflows int64: use smaller values")


def gqa(heads: int, kv_heads: int, kv_name: str) -> None:
    if kv_heads < 1 or heads % kv_heads != 0:
        fail(f"{kv_name} has {kv_heads} heads; the query heads ({heads}) must be a multiple of it")


def scale_value(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        fail_type(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        fail(f"scale must be finite, got {scale}")
    return float(scale)


INT32_MAX = 2**31 - 1


def ranges(r, pool_len: int, name: str = "ranges", device=None) -> TokenRanges:
    """Checks half-open token ranges [R, 2] (in bounds, start <= end, pairwise disjoint, empty
    ones allowed anywhere) and returns them as ``TokenRanges``: contiguous int32 on ``device``
    (default: where they are). Any integer dtype, any strides, or nested lists. Prepared
    ``TokenRanges`` are trusted: only their bounds are checked, on the host ints they carry."""
    if pool_len > INT32_MAX:
        fail(f"{name}: pools of more than 2**31 - 1 tokens are not supported, got {pool_len}")
    if isinstance(r, TokenRanges):
        return _prepared_ranges(r, pool_len, name, device)
    if isinstance(r, torch.Tensor):
        if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
            fail_type(f"{name} must be an int32 tensor of shape [R, 2] (any integer dtype), got "
                      f"dtype {r.dtype}")
        if r.device.type == "meta":
            fail(f"{name} must hold values (a CPU or CUDA tensor, or a list), got a meta tensor")
        if r.dim() != 2 or r.shape[1] != 2:
            fail(f"{name} must have shape [R, 2], got {tuple(r.shape)}")
        device = r.device if device is None else device
        if torch.compiler.is_compiling():
            return _traced_ranges(r.to(device, torch.int64), pool_len, name)
        # Checked in int64: an int64 value cast to int32 first could wrap into bounds.
        rows = r.detach().to("cpu", torch.int64).tolist()
    elif isinstance(r, Sequence) and not isinstance(r, (str, bytes)):
        rows = [list(p) if isinstance(p, Sequence) and not isinstance(p, (str, bytes)) else p
                for p in r]
        if any(not isinstance(p, list) or len(p) != 2 for p in rows):
            fail(f"{name} must be a list of (start, end) pairs, got {r!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for p in rows for v in p):
            fail_type(f"{name} entries must be ints, got {r!r}")
    else:
        fail_type(f"{name} must be an int32 tensor [R, 2] or a list of (start, end), got "
                  f"{type(r).__name__}")
    # Python ints: no bound can wrap, whatever was given.
    for i, (s, e) in enumerate(rows):
        if not 0 <= s <= e <= pool_len:
            fail(f"{name}[{i}] = [{s}, {e}) must satisfy 0 <= start <= end <= {pool_len}")
    srt = sorted((s, e) for s, e in rows if s < e)
    for (s0, e0), (s1, e1) in zip(srt, srt[1:]):
        if s1 < e0:
            fail(f"{name} must not overlap: [{s0}, {e0}) and [{s1}, {e1})")
    pairs = tuple((s, e) for s, e in rows)
    t = torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2)
    return TokenRanges(t.to(device or "cpu"), pairs)


def _traced_ranges(r: torch.Tensor, pool_len: int, name: str) -> TokenRanges:
    """Under torch.compile the values are data the tracer cannot read: the same checks as
    asserts in the graph, which fail when it runs, before any kernel."""
    s, e = r[:, 0], r[:, 1]
    torch._assert_async(((s >= 0) & (s <= e) & (e <= pool_len)).all(),
                        f"{name}: every range must satisfy 0 <= start <= end <= {pool_len}")
    nonempty = s < e
    order = torch.argsort(torch.where(nonempty, s, INT64_MAX))
    s_o, e_o, ne_o = s[order], e[order], nonempty[order]
    torch._assert_async(((s_o[1:] >= e_o[:-1]) | ~ne_o[1:]).all(), f"{name} must not overlap")
    return TokenRanges(r.to(torch.int32).contiguous(), None)


def _prepared_ranges(r: TokenRanges, pool_len: int, name: str, device) -> TokenRanges:
    if device is not None and r.device != torch.device(device):
        fail(f"{name} (prepared TokenRanges) must be on {torch.device(device)}, got {r.device}")
    if r.pairs is not None and r.end > pool_len:
        fail(f"{name} reaches token {r.end}, past the pool of {pool_len} tokens")
    return r


def positions(p, count: int, name: str, unit: str) -> torch.Tensor:
    """Finite float positions (a number for every entry, or [count]) as float64 [count] on the
    CPU: host values from which the kernels build their angle tables."""
    if isinstance(p, torch.Tensor):
        if p.dim() > 1:
            fail(f"{name} must be 1-D [{unit}], got shape {tuple(p.shape)}")
        if p.device.type == "meta":
            fail(f"{name} must hold values (a CPU or CUDA tensor, or a list), got a meta tensor")
        out = p.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(p, (int, float)) and not isinstance(p, bool):
        out = torch.full((count,), float(p), dtype=torch.float64)
    elif isinstance(p, Sequence) and not isinstance(p, (str, bytes)):
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in p):
            fail_type(f"{name} must be numbers, got {list(p)!r}")
        out = torch.tensor([float(v) for v in p], dtype=torch.float64)
    else:
        fail_type(f"{name} must be a number, a float tensor [{unit}] or a list of numbers, got "
                  f"{type(p).__name__}")
    if out.shape[0] != count:
        fail(f"{name} must have shape [{unit}] = [{count}] (one entry per "
             f"{'range' if unit == 'R' else 'frame'}), got {out.shape[0]} entries")
    finite = torch.isfinite(out).all()
    if torch.compiler.is_compiling():
        torch._assert_async(finite, f"{name} must be finite")
    elif not bool(finite):
        fail(f"{name} must be finite, got {out.tolist()}")
    return out


def grid3(grid, tokens: int) -> None:
    if not (isinstance(grid, Sequence) and len(grid) == 3 and all(
            isinstance(g, int) and not isinstance(g, bool) for g in grid)):
        fail_type(f"grid must be a tuple of three ints (F, h, w), got {grid!r}")
    f, h, w = grid
    if f < 0 or h < 1 or w < 1 or f * h * w != tokens:
        fail(f"grid (F, h, w) = {tuple(grid)} must have F*h*w == L = {tokens}")
    fits_int64(f * h * w if f else h * w, "the grid's token count F*h*w (h*w when F = 0)")


def t_theta(tt, heads: int) -> None:
    if tt is None:
        return
    if not isinstance(tt, torch.Tensor) or tt.dim() != 1 or tt.shape[0] != heads:
        shape = tuple(tt.shape) if isinstance(tt, torch.Tensor) else type(tt).__name__
        (fail if isinstance(tt, torch.Tensor) else fail_type)(
            f"t_theta must be a float tensor of shape [H] = [{heads}], got {shape}")
    if not tt.is_floating_point():
        fail(f"t_theta must be floating point, got {tt.dtype}")
    if tt.device.type == "meta":
        fail("t_theta must hold values (a CPU or CUDA tensor), got a meta tensor")
    ok = ((tt > 0) & torch.isfinite(tt)).all()
    if torch.compiler.is_compiling():
        torch._assert_async(ok, "t_theta must be finite and > 0")
    elif not bool(ok):
        fail(f"t_theta must be finite and > 0, got {tt.tolist()}")


def rope_params(theta, frame_offset=0.0) -> None:
    """theta > 0 and finite; frame_offset finite: either would otherwise give NaN keys."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        fail_type(f"theta must be a finite number > 0, got {theta!r}")
    if not (math.isfinite(theta) and theta > 0):
        fail(f"theta must be a finite number > 0, got {theta!r}")
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, (int, float)):
        fail_type(f"frame_offset must be a finite number, got {frame_offset!r}")
    if not math.isfinite(frame_offset):
        fail(f"frame_offset must be a finite number, got {frame_offset!r}")


def rope_input(x, name: str) -> None:
    tensor(x, name, 4, "[B, L, H, D]")
    floating(x, name)
    if x.shape[-1] % 2 or x.shape[-1] < 2:
        fail(f"{name} head dim D must be even and >= 2, got {x.shape[-1]}")




# ----------------------------------------------------------------------------- memory layout


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its last dim contiguous, the one layout rule every kernel relies on: a copy
    only where that dim is strided (any other strides are read as they are)."""
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _dims_by_stride(t: torch.Tensor) -> list:
    return sorted(((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1), reverse=True)


def self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (expanded, stride-0 or overlapping
    strides): each stride must step past everything the smaller ones reach."""
    extent = 0
    for st, sz in reversed(_dims_by_stride(t)):
        if st <= extent:
            return True
        extent += st * (sz - 1)
    return False


def writable(t: torch.Tensor, name: str) -> None:
    """An in-place output: every element written must be its own memory."""
    if self_overlapping(t):
        fail(f"{name} is written in place, so no two of its elements may share memory; got "
             f"shape {tuple(t.shape)} with strides {t.stride()} (an expanded or stride-0 view?)")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    extent = sum((sz - 1) * st for st, sz in zip(t.stride(), t.shape))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def spans_intersect(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory ``a`` and ``b`` reach could intersect (a cheap, conservative test).
    Under torch.compile addresses are unknown: False (the C++ in-place ops still refuse
    overlapping pools when the graph runs)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or torch.compiler.is_compiling():
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def _reachable(delta: int, dims: list) -> bool:
    """Whether ``delta`` = sum_d i_d * stride_d with |i_d| < size_d (dims by stride, largest
    first, each stride past everything the smaller ones reach: then only the two multiples of a
    stride nearest ``delta`` can work)."""
    if not dims:
        return delta == 0
    (st, sz), rest = dims[0], dims[1:]
    q = delta // st
    return any(abs(i) <= sz - 1 and _reachable(delta - i * st, rest) for i in (q, q + 1))


def share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some element of ``a`` and some element of ``b`` are the same memory. Exact for
    tensors of one layout (k/v views of one packed buffer); an address comparison otherwise."""
    if not spans_intersect(a, b):
        return False
    if a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and not (
            self_overlapping(a)):
        delta = b.data_ptr() - a.data_ptr()
        if delta % a.element_size() == 0:
            return _reachable(delta // a.element_size(), _dims_by_stride(a))
    if a.numel() + b.numel() > 2**24:
        return True  # too large to compare addresses: refused rather than risked

    def addresses(t):
        idx = torch.zeros((), dtype=torch.int64)
        for st, sz in zip(t.stride(), t.shape):
            idx = idx[..., None] + torch.arange(sz, dtype=torch.int64) * st * t.element_size()
        start = idx.reshape(-1) + t.data_ptr()
        return (start[:, None] + torch.arange(t.element_size())).reshape(-1)

    return bool(torch.isin(addresses(a), addresses(b)).any())


def disjoint_outputs(a: torch.Tensor, name_a: str, b: torch.Tensor, name_b: str) -> None:
    """Two in-place outputs must not share an element."""
    if share_memory(a, b):
        fail(f"{name_a} and {name_b} are both written in place and must not share memory")


def apart_from(t: torch.Tensor, *outputs: torch.Tensor) -> torch.Tensor:
    """An input the op reads while it writes ``outputs`` (say ``k`` given as a view of
    ``k_pool``): a copy where they could meet, so the result is as if read first."""
    return t.clone() if any(spans_intersect(t, o) for o in outputs) else t


@contextlib.contextmanager
def written_in_place(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Where the kernels write ``t``: ``t`` itself when its rows are contiguous, else a
    contiguous copy that is copied back (so any non-overlapping layout is handled, on every
    backend alike)."""
    if rows_contiguous(t) is t:
        yield t
        return
    tmp = t.contiguous()
    yield tmp
    t.copy_(tmp)
