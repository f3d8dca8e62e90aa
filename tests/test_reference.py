"""The reference ops against naive loops written straight from docs/spec.md on tiny float64 inputs:
the oracle every kernel is tested against must itself be right."""

import math

import pytest
import torch

from vidstream import reference
from vidstream.ops.rope_math import rope_bands

f64 = dict(dtype=torch.float64)


def naive_attention_row(q_i, k, v, allowed_j, scale):
    """softmax over allowed j of scale * q_i.k_j, times v; and the lse."""
    if not allowed_j:
        return torch.zeros(v.shape[-1], **f64), -math.inf
    s = torch.stack([scale * torch.dot(q_i, k[j]) for j in allowed_j])
    lse = torch.logsumexp(s, 0)
    p = torch.exp(s - lse)
    return sum(p[n] * v[j] for n, j in enumerate(allowed_j)), float(lse)


def allowed(i, j, ft, cf, sink, window):
    fi, fj = i // ft, j // ft
    ci, cj = fi // cf, fj // cf
    end = (ci + 1) * cf
    return cj <= ci and (fj < sink or window is None or fj >= end - window)


@pytest.mark.parametrize("ft,cf,sink,window,frames,H,H_kv", [
    (1, 1, 0, None, 5, 2, 2),
    (2, 3, 1, 3, 7, 4, 2),
    (3, 2, 0, 2, 5, 3, 1),
    (2, 1, 2, 4, 8, 2, 1),
])
def test_chunk_attention_matches_naive_loop(ft, cf, sink, window, frames, H, H_kv):
    L, D, Dv = ft * frames, 4, 3
    q = torch.randn(1, L, H, D, **f64)
    k = torch.randn(1, L, H_kv, D, **f64)
    v = torch.randn(1, L, H_kv, Dv, **f64)
    out, lse = reference.chunk_attention(q, k, v, frame_tokens=ft, chunk_frames=cf,
                                         sink_frames=sink, window_frames=window, scale=0.7,
                                         return_lse=True)
    assert out.shape == (1, L, H, Dv) and lse.shape == (1, H, L) and lse.dtype == torch.float32
    g = H // H_kv
    for h in range(H):
        for i in range(L):
            js = [j for j in range(L) if allowed(i, j, ft, cf, sink, window)]
            want, want_lse = naive_attention_row(q[0, i, h], k[0, :, h // g], v[0, :, h // g], js, 0.7)
            torch.testing.assert_close(out[0, i, h], want)
            assert lse[0, h, i].item() == pytest.approx(want_lse, rel=1e-6)


def test_chunk_mask_window_counts_from_chunk_end():
    # 1 token per frame, 2-frame chunks, window 3, sink 1: query frame 4 (chunk 2, frames 4-5)
    # sees sink frame 0 and frames >= 6 - 3 = 3, up to its chunk's end (frame 5).
    m = reference.chunk_mask(8, 1, 2, sink_frames=1, window_frames=3)
    assert m[4].nonzero().flatten().tolist() == [0, 3, 4, 5]
    assert m[1].nonzero().flatten().tolist() == [0, 1]


def test_cached_attention_matches_naive_loop():
    B, P, Lq, H, H_kv, D, Dv = 2, 20, 3, 4, 2, 5, 6
    q = torch.randn(B, Lq, H, D, **f64)
    kp = torch.randn(B, P, H_kv, D, **f64)
    vp = torch.randn(B, P, H_kv, Dv, **f64)
    ranges = [[15, 19], [2, 2], [0, 3], [7, 8]]
    out, lse = reference.cached_attention(q, kp, vp, torch.tensor(ranges, dtype=torch.int32),
                                          return_lse=True)
    tokens = [j for s, e in ranges for j in range(s, e)]
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                want, want_lse = naive_attention_row(q[b, i, h], kp[b, :, h // 2], vp[b, :, h // 2],
                                                     tokens, D**-0.5)
                torch.testing.assert_close(out[b, i, h], want)
                assert lse[b, h, i].item() == pytest.approx(want_lse, rel=1e-6)


def test_cached_attention_empty_union():
    q = torch.randn(1, 3, 2, 4, **f64)
    kp, vp = torch.randn(1, 5, 2, 4, **f64), torch.randn(1, 5, 2, 7, **f64)
    out, lse = reference.cached_attention(q, kp, vp, [[2, 2]], return_lse=True)
    assert torch.equal(out, torch.zeros(1, 3, 2, 7, **f64))
    assert torch.isneginf(lse).all()


def naive_rope_token(x_hd, t, y, xc, theta, t_theta_h):
    """Rotate one head vector of one token, pair by pair, as the SPEC words it."""
    D = x_hd.shape[0]
    c_t, c_h, c_w = rope_bands(D)
    out = x_hd.clone()
    for p in range(D // 2):
        if p < c_t:
            band_p, n, pos, th = p, c_t, t, t_theta_h
        elif p < c_t + c_h:
            band_p, n, pos, th = p - c_t, c_h, y, theta
        else:
            band_p, n, pos, th = p - c_t - c_h, c_w, xc, theta
        omega = th ** (-2 * band_p / (2 * n))
        z = complex(x_hd[2 * p].item(), x_hd[2 * p + 1].item()) * complex(
            math.cos(pos * omega), math.sin(pos * omega))
        out[2 * p], out[2 * p + 1] = z.real, z.imag
    return out


@pytest.mark.parametrize("D", [12, 64, 128])
@pytest.mark.parametrize("per_head", [False, True])
def test_rope3d_matches_naive_loop(D, per_head):
    F, h, w, H = 2, 2, 3, 2
    x = torch.randn(1, F * h * w, H, D, **f64)
    tt = torch.tensor([9000.0, 12000.0], **f64) if per_head else None
    out = reference.rope3d(x, grid=(F, h, w), frame_offset=5, t_theta=tt)
    for i in range(F * h * w):
        t, y, xc = 5 + i // (h * w), (i % (h * w)) // w, i % w
        for hh in range(H):
            th = tt[hh].item() if per_head else 10000.0
            want = naive_rope_token(x[0, i, hh], t, y, xc, 10000.0, th)
            torch.testing.assert_close(out[0, i, hh], want)


def test_rope_bands_wan_layout():
    assert rope_bands(128) == (22, 21, 21)  # Wan2.1 at head dim 128
    assert sum(rope_bands(96)) == 48 and sum(rope_bands(64)) == 32


def test_rope3d_shift_matches_naive_loop():
    D, H = 64, 3
    pool = torch.randn(1, 9, H, D, **f64)
    tt = torch.tensor([8000.0, 10000.0, 13000.0], **f64)
    out = reference.rope3d_shift_(pool.clone(), [[5, 9], [0, 2]], [-2.5, 100.0], t_theta=tt)
    c_t = rope_bands(D)[0]
    for i in range(9):
        d = -2.5 if i >= 5 else (100.0 if i < 2 else 0.0)
        for hh in range(H):
            want = pool[0, i, hh].clone()
            for p in range(c_t):
                om = tt[hh].item() ** (-2 * p / (2 * c_t))
                z = complex(want[2 * p].item(), want[2 * p + 1].item()) * complex(
                    math.cos(d * om), math.sin(d * om))
                want[2 * p], want[2 * p + 1] = z.real, z.imag
            torch.testing.assert_close(out[0, i, hh], want)


def test_lowrank_matches_naive_loop():
    B, P, H, d_c, d_nope, d_r, d_v = 2, 12, 3, 5, 4, 2, 6
    c = torch.randn(B, P, d_c, **f64)
    kr = torch.randn(B, P, d_r, **f64)
    w_uk, w_uv = torch.randn(H, d_c, d_nope, **f64), torch.randn(H, d_c, d_v, **f64)
    ranges = [[8, 11], [1, 3]]
    k, v = reference.lowrank_decompress(c, w_uk, w_uv, ranges, k_r_pool=kr)
    tokens = [8, 9, 10, 1, 2]
    assert k.shape == (B, 5, H, d_nope + d_r) and v.shape == (B, 5, H, d_v)
    for b in range(B):
        for n, j in enumerate(tokens):
            for h in range(H):
                torch.testing.assert_close(k[b, n, h, :d_nope], c[b, j] @ w_uk[h])
                torch.testing.assert_close(k[b, n, h, d_nope:], kr[b, j])
                torch.testing.assert_close(v[b, n, h], c[b, j] @ w_uv[h])
    q = torch.randn(B, 4, H, d_nope + d_r, **f64)
    out = reference.lowrank_cached_attention(q, c, w_uk, w_uv, ranges, k_r_pool=kr)
    want = reference.cached_attention(q, k, v, [[0, 5]])
    torch.testing.assert_close(out, want)


def naive_block_scores(q, kp, blocks, stride, heads, score, scale):
    B, Lq, H, D = q.shape
    g = H // kp.shape[2]
    S = list(range(0, Lq, stride))
    out = []
    for s, e in blocks:
        if score == "mean":
            tot = 0.0
            for b in range(B):
                for h in heads:
                    for i in S:
                        tot += sum(scale * torch.dot(q[b, i, h], kp[b, j, h // g]).item()
                                   for j in range(s, e))
            out.append(tot / (B * len(heads) * len(S)))
        else:
            if s == e:
                out.append(-math.inf)
                continue
            tot = 0.0
            for b in range(B):
                for h in heads:
                    qbar = sum(q[b, i, h] for i in S) / len(S)
                    tot += max(scale * torch.dot(qbar, kp[b, j, h // g]).item() for j in range(s, e))
            out.append(tot / (B * len(heads)))
    return out


@pytest.mark.parametrize("score", ["mean", "max"])
@pytest.mark.parametrize("stride,heads,k", [(1, None, 2), (3, [1, 3], 3), (2, [0], 10)])
def test_select_blocks_matches_naive_loop(score, stride, heads, k):
    B, Lq, H, H_kv, D = 2, 7, 4, 2, 5
    q = torch.randn(B, Lq, H, D, **f64)
    kp = torch.randn(B, 30, H_kv, D, **f64)
    blocks = [[0, 4], [4, 10], [12, 13], [20, 30], [10, 12]]
    got = reference.select_blocks(q, kp, blocks, k, query_stride=stride, heads=heads, score=score)
    hs = heads if heads is not None else list(range(H // 2))
    s = naive_block_scores(q, kp, blocks, stride, hs, score, D**-0.5)
    want = sorted(sorted(range(len(blocks)), key=lambda m: (-s[m], m))[:k])
    assert got.dtype == torch.int64 and got.tolist() == want


def test_select_blocks_ties_go_to_smaller_index():
    q = torch.randn(1, 4, 2, 8, **f64)
    kp = torch.randn(1, 6, 2, 8, **f64)
    kp[:, 3:6] = kp[:, 0:3]  # blocks 0 and 1 are identical; so are 2 and 3
    kp = torch.cat([kp, kp], 1)
    blocks = [[0, 3], [3, 6], [6, 9], [9, 12]]
    for score in ("mean", "max"):
        got = reference.select_blocks(q, kp, blocks, 1, query_stride=1, score=score).tolist()
        assert got in ([0], [2]) and got != [1] and got != [3]
        assert reference.select_blocks(q, kp, blocks, 3, query_stride=1, score=score).tolist() in (
            [0, 1, 2], [0, 2, 3])


@pytest.mark.parametrize("call,match", [
    (lambda: reference.chunk_attention(torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4),
                                       torch.randn(1, 6, 2, 4), frame_tokens=4, chunk_frames=1),
     "multiple of frame_tokens"),
    (lambda: reference.chunk_attention(torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4),
                                       torch.randn(1, 8, 2, 4), frame_tokens=2, chunk_frames=3,
                                       window_frames=2), "window_frames must be >= chunk_frames = 3"),
    (lambda: reference.chunk_attention(torch.randn(1, 8, 3, 4), torch.randn(1, 8, 2, 4),
                                       torch.randn(1, 8, 2, 4), frame_tokens=2, chunk_frames=1),
     "must be a multiple"),
    (lambda: reference.cached_attention(torch.randn(1, 2, 2, 4), torch.randn(1, 5, 2, 4),
                                        torch.randn(1, 5, 2, 4), [[0, 3], [2, 4]]), "must not overlap"),
    (lambda: reference.cached_attention(torch.randn(1, 2, 2, 4), torch.randn(1, 5, 2, 4),
                                        torch.randn(1, 5, 2, 4).half(), [[0, 3]]), "dtype"),
    (lambda: reference.cached_attention(torch.randn(1, 2, 2, 4), torch.randn(1, 5, 2, 4),
                                        torch.randn(1, 5, 2, 4), [[0, 6]]), "<= 5"),
    (lambda: reference.lowrank_decompress(torch.randn(1, 5, 8), torch.randn(2, 7, 4),
                                          torch.randn(2, 8, 4), [[0, 2]]), "w_uk must have shape"),
    (lambda: reference.select_blocks(torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), [[0, 3]], 1,
                                     score="median"), "score must be"),
    (lambda: reference.select_blocks(torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), [[0, 3]], 1,
                                     heads=[2]), "heads must be distinct"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_non_finite_scale_is_refused(scale):
    q = torch.randn(1, 2, 2, 4)
    with pytest.raises(ValueError, match="scale must be finite"):
        reference.cached_attention(q, torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), [[0, 3]],
                                   scale=scale)


def test_empty_union_lse_is_float32_whatever_the_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _, lse = reference.cached_attention(torch.randn(1, 2, 2, 4), torch.randn(1, 5, 2, 4),
                                            torch.randn(1, 5, 2, 4), [], return_lse=True)
    finally:
        torch.set_default_dtype(old)
    assert lse.dtype == torch.float32 and torch.isneginf(lse).all()


def test_select_blocks_heads_must_be_ints():
    with pytest.raises(ValueError, match="heads must be a list of ints"):
        reference.select_blocks(torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), [[0, 3]], 1,
                                heads=[1.9])
