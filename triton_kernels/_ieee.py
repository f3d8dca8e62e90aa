"""Triton helpers shared by the softmax kernels for the NaN/Inf rule of docs/spec.md
(Conventions, "NaN and Inf"): IEEE propagation as in SDPA, where ``tl.max`` / ``tl.maximum``
would silently drop a NaN (fmax semantics, on the GPU and in the interpreter alike)."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter runs a reduction's combine function in Python, element pair by element pair
# (about 40x the time of tl.max for an attention tile): there, NaN-propagating maxima are formed
# from two native reductions instead. Same result; the GPU keeps the single max.NaN reduction.
_INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def maximum_nan(a, b):
    """max(a, b) that returns NaN when either is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_nan(x, axis: tl.constexpr):
    """Maximum of ``x`` along ``axis``, NaN where the reduced elements hold a NaN."""
    if _INTERPRET:
        return tl.where(tl.max((x != x).to(tl.int32), axis) > 0, float("nan"), tl.max(x, axis))
    else:
        return tl.reduce(x, axis, maximum_nan)


@triton.jit
def running_max(m_i, s):
    """(m_new, m_use) of one online-softmax step over the score tile s [M, N]: the running row
    maximum, NaN once a row meets a NaN score, and the value the exponentials are taken relative
    to: m_new, or 0 while a row has seen only -inf scores (masked keys, -inf logits), so that
    exp(-inf - -inf) never makes a NaN. One helper (not three): the interpreter pays for every
    nested call."""
    if _INTERPRET:
        blk = tl.where(tl.max((s != s).to(tl.int32), 1) > 0, float("nan"), tl.max(s, 1))
    else:
        blk = tl.reduce(s, 1, maximum_nan)
    m_new = tl.maximum(m_i, blk, propagate_nan=tl.PropagateNan.ALL)
    return m_new, tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def finalize(acc, m_i, l_i, nonempty, LOG2: tl.constexpr):
    """(out, lse) of an online softmax, as torch.softmax / torch.logsumexp give them: an empty
    allowed set (``nonempty`` false) gives 0 and -inf; allowed keys whose scores are all -inf
    give NaN and -inf; a NaN score gives NaN (the NaN-propagating running max holds it); a +inf
    score gives out NaN (inf - inf) and lse +inf. ``LOG2``: m_i is in log2 units."""
    zero = l_i == 0.0
    # One division, as without the rule: by l, or by NaN (allowed keys, all scores -inf), or
    # by 1 (an empty set, where acc is 0).
    out = acc / tl.where(zero, tl.where(nonempty, float("nan"), 1.0), l_i)[:, None]
    if LOG2:
        lse = (m_i + tl.math.log2(tl.where(zero, 1.0, l_i))) * 0.6931471805599453
    else:
        lse = m_i + tl.log(tl.where(zero, 1.0, l_i))
    lse = tl.where(zero, float("-inf"), lse)
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    return out, lse
