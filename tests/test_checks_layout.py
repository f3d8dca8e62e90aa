"""The common layout mistake, [B, H, L, D] tensors (PyTorch SDPA's layout) where vidstream takes
[B, L, H, D]: a rejected call whose shapes would fit with dims 1 and 2 swapped says so, naming
the tensors and the fix; other errors are left as they are."""

import re

import pytest
import torch

import vidstream
from vidstream import reference

B, H, HKV, L, D = 1, 4, 2, 48, 16


def _qkv():
    return torch.randn(B, L, H, D), torch.randn(B, L, HKV, D), torch.randn(B, L, HKV, D)


def _bhld(*ts):
    return [t.transpose(1, 2) for t in ts]


def _raises_hint(fn, hint):
    with pytest.raises(ValueError) as e:
        fn()
    assert hint in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("op", [vidstream.chunk_attention, reference.chunk_attention])
def test_chunk_attention_all_three_transposed(op):
    q, k, v = _bhld(*_qkv())
    msg = _raises_hint(lambda: op(q, k, v, frame_tokens=16, chunk_frames=1),
                       "q, k and v look like [B, H, L, D]; vidstream takes [B, L, H, D]: pass "
                       "q.transpose(1, 2), k.transpose(1, 2) and v.transpose(1, 2)")
    assert msg.count("\n") == 0
    # The fix it names works.
    op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), frame_tokens=16, chunk_frames=1)


def test_cached_attention_names_only_the_transposed_tensors():
    q, k, v = _qkv()
    kt, vt = _bhld(k, v)
    _raises_hint(lambda: vidstream.cached_attention(q, kt, vt, [[0, 32]]),
                 "k_pool and v_pool look like [B, H_kv, P, D]; vidstream takes [B, P, H_kv, D]: "
                 "pass k_pool.transpose(1, 2) and v_pool.transpose(1, 2)")
    (qt,) = _bhld(q[:, :5])  # 5 "heads" over 2 kv heads: refused (a multiple would pass unseen)
    msg = _raises_hint(lambda: vidstream.cached_attention(qt, k, v, [[0, 32]]),
                       "q looks like [B, H, Lq, D]; vidstream takes [B, Lq, H, D]: pass "
                       "q.transpose(1, 2)")
    assert "k_pool" not in msg.split(". ")[-1]
    qt, kt, vt = _bhld(q, k, v)
    _raises_hint(lambda: vidstream.cached_attention(qt, kt, vt, [[0, 32]]),
                 "pass q.transpose(1, 2), k_pool.transpose(1, 2) and v_pool.transpose(1, 2)")


def test_rope_ops():
    x = torch.randn(B, L, H, D)
    _raises_hint(lambda: vidstream.rope3d(x.transpose(1, 2), grid=(3, 4, 4)),
                 "x looks like [B, H, L, D]; vidstream takes [B, L, H, D]: pass x.transpose(1, 2)")
    pool = torch.randn(B, L, HKV, D)
    _raises_hint(lambda: vidstream.rope3d_shift_(pool.transpose(1, 2), [[0, 16]], [1.0]),
                 "k_pool looks like [B, H, P, D]; vidstream takes [B, P, H, D]: pass "
                 "k_pool.transpose(1, 2)")
    k_pool, v_pool = torch.zeros(B, 32, HKV, D), torch.zeros(B, 32, HKV, D)
    k, v = torch.randn(B, 16, HKV, D), torch.randn(B, 16, HKV, D)
    kt, vt = _bhld(k, v)
    _raises_hint(lambda: vidstream.rope3d_store_(k_pool, v_pool, kt, vt, [0], [0.0], grid=(1, 4, 4)),
                 "k and v look like [B, H_kv, L, D]; vidstream takes [B, L, H_kv, D]: pass "
                 "k.transpose(1, 2) and v.transpose(1, 2)")


def test_select_blocks_and_lowrank():
    q, k, _ = _qkv()
    qt, kt = _bhld(q, k)
    _raises_hint(lambda: vidstream.select_blocks(qt, kt, [[0, 16], [16, 32]], 1),
                 "q and k_pool look like [B, H, Lq, D]; vidstream takes [B, Lq, H, D]")
    c_pool = torch.randn(B, 32, 8)
    w_uk, w_uv = torch.randn(H, 8, D), torch.randn(H, 8, D)
    q = torch.randn(B, 6, H, D)
    _raises_hint(lambda: vidstream.lowrank_cached_attention(q.transpose(1, 2), c_pool, w_uk, w_uv,
                                                            [[0, 32]]),
                 "q looks like [B, H, Lq, d_nope + d_r]; vidstream takes [B, Lq, H, d_nope + d_r]")


def test_no_hint_where_swapping_does_not_help():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as e:  # head dims differ: no layout explains that
        vidstream.chunk_attention(q, k[..., :8], v, frame_tokens=16, chunk_frames=1)
    assert "transpose" not in str(e.value)
    with pytest.raises(TypeError) as e:  # not a tensor: a type error, as before
        vidstream.chunk_attention(q, k.tolist(), v, frame_tokens=16, chunk_frames=1)
    assert "transpose" not in str(e.value)
    with pytest.raises(ValueError, match=r"^frame_tokens must be an int >= 1, got 0$"):
        vidstream.chunk_attention(q, k, v, frame_tokens=0, chunk_frames=1)


def test_square_dims_are_not_blamed():
    """A tensor whose dims 1 and 2 are equal cannot be the transposed one."""
    q = torch.randn(B, 8, 8, D)   # L == H: either layout
    k = torch.randn(B, 2, 8, D)   # [B, H_kv, P, D] by mistake
    msg = _raises_hint(lambda: vidstream.cached_attention(q, k, k, [[0, 8]]),
                       "k_pool and v_pool look like")
    assert not re.search(r"\bq\.transpose", msg)
