"""``RollingBufferCache`` (Self-Forcing / LongLive's rolling KV buffer, the honest baseline):
equal to an explicit float64 formulation of its rule (absolute positions, sink pinned, the last
``recent_frames`` frames, the current chunk), fixed bytes, the generator's ``cache="rolling"``,
and a clear error where its RoPE table runs out."""

import pytest
import torch

from vidstream import reference
from vidstream.streaming import CacheConfig, StreamingDiT, StreamingGenerator
from vidstream.streaming.rolling_cache import RollingBufferCache, RopeTableExhausted


def _rotated(x, frame_offset, grid):
    return reference.rope3d(x.double(), grid=grid, frame_offset=frame_offset)


def _oracle(q, k, v, hist_k, hist_v, start, S, R, h, w, C, position=lambda f: f):
    """Attention of the chunk starting at absolute frame ``start`` in float64, built from the rule
    alone: the buffer holds S + R + C frames, so besides the chunk's own F frames it keeps frames
    [0, S) and the last S + R + C - S - F before it (R for a whole chunk), from the raw history
    rotated at their absolute frame index (``position``); everything is attended with no mask."""
    hw = h * w
    Fr = q.shape[1] // hw
    recent = R + C - Fr
    frames = [f for f in range(start) if f < S or f >= max(S, start - recent)]
    ks = [_rotated(hist_k[:, f * hw:(f + 1) * hw], position(f), (1, h, w)) for f in frames]
    vs = [hist_v[:, f * hw:(f + 1) * hw].double() for f in frames]
    ks.append(_rotated(k, position(start), (Fr, h, w)))
    vs.append(v.double())
    keys, values = torch.cat(ks, 1), torch.cat(vs, 1)
    qr = _rotated(q, position(start), (Fr, h, w))
    scores = torch.einsum("bqhd,bkhd->bhqk", qr, keys) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values)


@pytest.mark.parametrize("C,S,R", [(2, 2, 4), (3, 0, 3), (1, 1, 0)])
def test_equals_the_absolute_index_rule_over_many_chunks(C, S, R):
    B, H, D, h, w, layers, passes = 2, 2, 12, 2, 3, 2, 3
    hw = h * w
    cfg = CacheConfig(chunk_frames=C, sink_frames=S, recent_frames=R, mid_blocks=0)
    cache = RollingBufferCache(num_layers=layers, batch=B, kv_heads=H, head_dim=D,
                               frame_shape=(h, w), config=cfg)
    nbytes = cache.nbytes
    g = torch.Generator().manual_seed(C * 100 + S * 10 + R)
    hist = [[torch.zeros(B, 0, H, D), torch.zeros(B, 0, H, D)] for _ in range(layers)]
    chunks = [C] * (16 // C) + [1]  # several evictions, and a partial last chunk
    start = 0
    for Fr in chunks:
        cache.begin_chunk(Fr)
        for step in range(passes):  # denoising passes overwrite the slot; the last one stays
            for layer in range(layers):
                q, k, v = (torch.randn(B, Fr * hw, H, D, generator=g) for _ in range(3))
                got = cache.attend(layer, q, k, v, (Fr, h, w))
                want = _oracle(q, k, v, *hist[layer], start, S, R, h, w, C)
                where = f"chunk at frame {start}, pass {step}, layer {layer}"
                torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6,
                                           msg=lambda m, where=where: f"{where}: {m}")
                if step == passes - 1:
                    hist[layer][0] = torch.cat([hist[layer][0], k], 1)
                    hist[layer][1] = torch.cat([hist[layer][1], v], 1)
        cache.end_chunk()
        start += Fr
        assert cache.nbytes == nbytes
    assert cache.max_position == start - 1
    assert nbytes == 2 * layers * B * (S + R + C) * hw * H * D * 4


def test_relative_positions_would_fail_the_comparison():
    """The comparison above can fail: the same frames at the bounded cache's relative positions
    (sink 0..S-1, then the window, then the chunk) give another answer."""
    B, H, D, h, w, S, R, C = 1, 2, 12, 2, 2, 2, 2, 2
    cfg = CacheConfig(chunk_frames=C, sink_frames=S, recent_frames=R, mid_blocks=0)
    cache = RollingBufferCache(num_layers=1, batch=B, kv_heads=H, head_dim=D, frame_shape=(h, w),
                               config=cfg)
    g = torch.Generator().manual_seed(0)
    hk, hv = torch.zeros(B, 0, H, D), torch.zeros(B, 0, H, D)
    for start in range(0, 12, C):
        cache.begin_chunk(C)
        q, k, v = (torch.randn(B, C * h * w, H, D, generator=g) for _ in range(3))
        got = cache.attend(0, q, k, v, (C, h, w)).double()
        cache.end_chunk()
        if start < 10:
            hk, hv = torch.cat([hk, k], 1), torch.cat([hv, v], 1)
    args = (q, k, v, hk, hv, 10, S, R, h, w, C)
    torch.testing.assert_close(got, _oracle(*args), atol=2e-6, rtol=2e-6)
    relative = _oracle(*args, position=lambda f: f if f < S else f - (10 - S - R))
    assert (got - relative).abs().max() > 1e-3


def test_raises_where_the_rope_table_ends():
    cfg = CacheConfig(chunk_frames=2, sink_frames=2, recent_frames=2, mid_blocks=0,
                      max_frames_rope=8)
    cache = RollingBufferCache(num_layers=1, batch=1, kv_heads=1, head_dim=6, frame_shape=(1, 1),
                               config=cfg)
    x = torch.randn(1, 2, 1, 6)
    for _ in range(4):  # frames 0..7: the table's 8 rows
        cache.begin_chunk(2)
        cache.attend(0, x, x, x, (2, 1, 1))
        cache.end_chunk()
    with pytest.raises(RuntimeError, match=r"8-frame RoPE table is exhausted.*\[8, 10\)"):
        cache.begin_chunk(2)


def test_default_table_is_wans_1024_frames():
    cfg = CacheConfig(chunk_frames=64, sink_frames=0, recent_frames=0, mid_blocks=0)
    cache = RollingBufferCache(num_layers=1, batch=1, kv_heads=1, head_dim=6, frame_shape=(1, 1),
                               config=cfg)
    x = torch.randn(1, 64, 1, 6)
    for _ in range(16):
        cache.begin_chunk(64)
        cache.attend(0, x, x, x, (64, 1, 1))
        cache.end_chunk()
    assert cache.max_position == 1023
    with pytest.raises(RopeTableExhausted, match="1,024-frame RoPE table is exhausted"):
        cache.begin_chunk(1)


def _tiny(**kw):
    return StreamingDiT("tiny", seed=0, **kw).eval()


def _text(m):
    return torch.randn(1, m.config.text_len, m.config.text_dim, generator=torch.Generator().manual_seed(3))


def test_generator_rolling_equals_naive_while_nothing_is_evicted():
    """Before the first eviction absolute and the naive cache's positions coincide: the same video."""
    m = _tiny()
    kw = dict(chunk_frames=3, sink_frames=3, recent_frames=6, mid_blocks=0, top_k=None, seed=1,
              timesteps=(1000, 500))
    a = StreamingGenerator(m, cache="rolling", **kw).generate(_text(m), 12)
    b = StreamingGenerator(m, cache="naive", **kw).generate(_text(m), 12)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generator_rolling_stops_with_the_clear_error_and_fixed_bytes():
    m = _tiny()
    gen = StreamingGenerator(m, cache="rolling", chunk_frames=3, sink_frames=3, recent_frames=3,
                             mid_blocks=0, top_k=None, timesteps=(1000,), max_frames_rope=12)
    sizes = []
    with pytest.raises(RuntimeError, match="12-frame RoPE table is exhausted"):
        for _ in gen.stream(_text(m), 15):
            sizes.append(gen.cache.nbytes)
    assert len(sizes) == 4 and len(set(sizes)) == 1


def test_mid_blocks_are_refused():
    with pytest.raises(ValueError, match="mid_blocks must be 0"):
        StreamingGenerator(_tiny(), cache="rolling", mid_blocks=2)
