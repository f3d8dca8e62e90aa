"""The streaming cache, model and generator against their oracles (docs/spec.md §6), tiny preset,
CPU."""

from dataclasses import replace

import pytest
import torch

import vidstream
from vidstream.streaming import (
    CacheConfig,
    FullSequenceAttention,
    StreamingDiT,
    StreamingGenerator,
    StreamingKVCache,
    bounded_cache,
)
from vidstream.streaming.compressors import AvgPoolCompressor
from vidstream.streaming.generator import warp_timesteps
from vidstream.streaming.model import PRESETS
from vidstream.streaming.naive_cache import NaiveKVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(**over):
    return StreamingDiT(replace(PRESETS["tiny"], **over), seed=0)


def _cache(m, B=1, compressor=None, **cfg):
    c = m.config
    return StreamingKVCache(num_layers=c.num_layers, batch=B, kv_heads=c.num_heads, head_dim=c.head_dim,
                            frame_shape=c.frame_shape, config=CacheConfig(**cfg), compressor=compressor)


def _text(m, B=1):
    return torch.randn(B, m.config.text_len, m.config.text_dim)


def _stream_teacher_forced(m, cache, x, t, text_kv, C):
    """Chunk by chunk: a throw-away pass on noise (as a denoising step would write), then the
    pass whose keys stay (end_chunk); returns the kept passes' outputs."""
    outs = []
    for s in range(0, x.shape[2], C):
        xc, tc = x[:, :, s:s + C], t[:, s:s + C]
        cache.begin_chunk(xc.shape[2])
        m(torch.randn_like(xc), tc.flip(1), text_kv, cache)
        outs.append(m(xc, tc, text_kv, cache))
        cache.end_chunk()
    return torch.cat(outs, dim=2)


def _full_and_streamed(m, frames, window_frames, B=1, compressor=None, **cfg):
    """One video with per-frame timesteps (the per-frame modulation is exercised) through
    ``FullSequenceAttention`` and, teacher-forced, through a fresh cache of partitions ``cfg``:
    returns (full, streamed, cache)."""
    C = cfg["chunk_frames"]
    x = torch.randn(B, 16, frames, 8, 8)
    t = torch.rand(B, frames) * 1000
    text_kv = m.text_kv(_text(m, B))
    with torch.no_grad():
        full = m(x, t, text_kv, FullSequenceAttention(chunk_frames=C, window_frames=window_frames))
        cache = _cache(m, B, compressor, **cfg)
        streamed = _stream_teacher_forced(m, cache, x, t, text_kv, C)
    return full, streamed, cache


@pytest.mark.parametrize("sink,B,frames", [(0, 1, 12), (3, 2, 12), (6, 1, 11)])
def test_streaming_equals_full_sequence_when_window_covers_video(sink, B, frames):
    m = _model()
    C = 3
    recent = ((frames - sink + C - 1) // C) * C
    full, streamed, cache = _full_and_streamed(m, frames, None, B, chunk_frames=C, sink_frames=sink,
                                               recent_frames=recent, mid_blocks=0)
    assert cache.max_position == frames - 1  # nothing evicted: the true positions
    torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-5)


def test_sliding_window_without_sink_equals_windowed_chunk_attention():
    """With no sink and no mid memory every kept key moves by the same amount, and RoPE attention
    depends only on position differences: the bounded-position ring (evictions, wrap-around,
    rope3d_shift_) must equal chunk_attention with window_frames = recent + chunk."""
    m = _model()
    C, R, frames = 3, 6, 27
    full, streamed, cache = _full_and_streamed(m, frames, R + C, chunk_frames=C, sink_frames=0,
                                               recent_frames=R, mid_blocks=0)
    assert cache.max_position == R + C - 1
    torch.testing.assert_close(streamed, full, atol=5e-5, rtol=1e-5)


def _gen_pair(m, frames, **kw):
    text = _text(m)
    a = StreamingGenerator(m, cache="bounded", **kw).generate(text, frames)
    b = StreamingGenerator(m, cache="naive", **kw).generate(text, frames)
    return a, b


@pytest.mark.parametrize("evict", ["oldest", "lowest"])
def test_fused_generator_equals_reference_generator(evict):
    m = _model()
    kw = dict(chunk_frames=3, sink_frames=3, recent_frames=6, mid_blocks=3, top_k=2, mid_evict=evict,
              select_stride=3, seed=5)
    a, b = _gen_pair(m, 30, **kw)  # 10 chunks: sink, window, mid eviction and top-k all active
    assert a.shape == (1, 16, 30, 8, 8)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The comparison can fail: a different selection budget changes the video.
    c = StreamingGenerator(m, **{**kw, "top_k": 1}).generate(_text(m), 30)
    assert (c - a).abs().max() > 1e-3


def test_partial_last_chunk_and_rerotating_cache_equal_reference():
    """A partial last chunk (frame-granular eviction keeps recent_frames frames before it), and
    the legacy re-rotating cache (rerotate=True) against the naive reference, mid blocks on."""
    m = _model(num_layers=1)
    kw = dict(chunk_frames=3, sink_frames=3, recent_frames=3, mid_blocks=2, top_k=1,
              mid_evict="lowest", select_stride=3, seed=6, timesteps=(1000, 500))
    text = _text(m)
    b = StreamingGenerator(m, cache="naive", **kw).generate(text, 17)  # 5 chunks of 3, then 2
    a = StreamingGenerator(m, cache="bounded", **kw).generate(text, 17)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    g = StreamingGenerator(m, **kw)
    c = g.cache
    g.cache = StreamingKVCache(num_layers=1, batch=1, kv_heads=c.k_pool.shape[3],
                               head_dim=c.k_pool.shape[4], frame_shape=(c.h, c.w), config=g.config,
                               rerotate=True)
    torch.testing.assert_close(g.generate(text, 17), b, atol=1e-4, rtol=1e-4)


def test_generator_uses_selection_and_mid_memory():
    m = _model()
    g = StreamingGenerator(m, chunk_frames=3, sink_frames=3, recent_frames=3, mid_blocks=4, top_k=2)
    chunks = list(g.stream(_text(m), 24))
    assert [c.shape[2] for c in chunks] == [3] * 8
    cache = g.cache
    assert cache.num_mid == 4 and all(len(a) == 2 for a in cache.active)
    ranges = cache.token_ranges(0) if cache._chunk else None
    assert ranges is None  # no chunk open after the stream
    assert cache.max_position <= cache.cfg.max_position


def test_seeded_and_partial_last_chunk():
    m = _model()
    text = _text(m)
    g = StreamingGenerator(m, seed=3, mid_blocks=2, top_k=1)
    a, b = g.generate(text, 10), g.generate(text, 10)
    assert a.shape[2] == 10 and torch.equal(a, b)
    assert not torch.equal(a, StreamingGenerator(m, seed=4, mid_blocks=2, top_k=1).generate(text, 10))


def test_long_rollout_bounded_positions_fixed_memory():
    """3,000 latent frames, past Wan's 1,024-position RoPE table."""
    m = _model(num_layers=1, latent_hw=(2, 2))
    g = StreamingGenerator(m, chunk_frames=3, sink_frames=3, recent_frames=6, mid_blocks=4, top_k=2,
                           timesteps=(1000, 500), select_stride=1, compressor=AvgPoolCompressor())
    bound = g.config.max_frames_rope
    sizes, finite, frames = set(), True, 0
    pool_ptr = g.cache.k_pool.data_ptr()
    for i, chunk in enumerate(g.stream(_text(m), 3000)):
        frames += chunk.shape[2]
        finite &= bool(torch.isfinite(chunk).all())
        if i >= 2:
            sizes.add(g.cache.nbytes)
        assert g.cache.max_position < bound
    assert frames == 3000 and finite
    assert len(sizes) == 1 and g.cache.k_pool.data_ptr() == pool_ptr
    assert g.cache.max_position == 3 + 2 * 3 + 6 + 3 - 1
    assert g.cache.frames_done == 3000


def test_ring_wraps_into_two_ranges_and_layout():
    m = _model(num_layers=1)
    cache = _cache(m, chunk_frames=2, sink_frames=2, recent_frames=4, mid_blocks=2, top_k=1)
    hw = 16
    text_kv = m.text_kv(_text(m))
    seen = []
    with torch.no_grad():
        for _ in range(7):
            cache.begin_chunk(2)
            m(torch.randn(1, 16, 2, 8, 8), 0.0, text_kv, cache)
            seen.append(cache.token_ranges(0).tolist())
            cache.end_chunk()
    mid_tokens = cache.mid_tokens
    assert mid_tokens == cache.compressor.mid_tokens((2, 4, 4))
    ring_off = 2 * hw + 2 * mid_tokens
    assert cache.pool_tokens == ring_off + 3 * 2 * hw
    assert seen[0] == [[0, 2 * hw]]                       # the sink chunk
    assert seen[1] == [[0, 2 * hw], [ring_off, ring_off + 2 * hw]]
    wrapped = [r for r in seen if sum(1 for a, _ in r if a >= ring_off) == 2]
    assert wrapped, f"the ring never wrapped: {seen}"
    for r in seen[4:]:  # sink, one active mid block, two previous chunks + the current one
        n_tokens = sum(b - a for a, b in r)
        assert n_tokens == 2 * hw + mid_tokens + 3 * 2 * hw


def test_mid_block_is_the_compressed_evicted_chunk():
    m = _model(num_layers=1)
    cache = _cache(m, chunk_frames=2, sink_frames=0, recent_frames=2, mid_blocks=2, top_k=2,
                   compressor=AvgPoolCompressor())
    text_kv = m.text_kv(_text(m))
    with torch.no_grad():
        for _ in range(2):
            cache.begin_chunk(2)
            m(torch.randn(1, 16, 2, 8, 8), 0.0, text_kv, cache)
            cache.end_chunk()
        ring_k = cache.k_pool[0, :, cache.ring_off:cache.ring_off + 32].clone()
        ring_v = cache.v_pool[0, :, cache.ring_off:cache.ring_off + 32].clone()
        cache.begin_chunk(2)  # evicts the first chunk into mid slot 0
    mt = cache.mid_tokens
    kc, vc = AvgPoolCompressor()(ring_k, ring_v, grid=(2, 4, 4))
    torch.testing.assert_close(cache.k_pool[0, :, cache.mid_off:cache.mid_off + mt], kc)
    torch.testing.assert_close(cache.v_pool[0, :, cache.mid_off:cache.mid_off + mt], vc)


def test_custom_compressor_interface():
    calls = []

    def first_token(k, v, *, grid, frame_offset):
        calls.append(tuple(grid))
        assert frame_offset == int(frame_offset) and 0 <= frame_offset < 1024
        return k[:, :5], v[:, :5]

    m = _model(num_layers=1)
    g = StreamingGenerator(m, chunk_frames=3, sink_frames=0, recent_frames=3, mid_blocks=2, top_k=1,
                           compressor=first_token, timesteps=(1000,))
    g.generate(_text(m), 15)
    assert g.cache.mid_tokens == 5 and calls and all(c == (3, 4, 4) for c in calls)


def test_memory_fixed_and_reported():
    m = _model()
    g = StreamingGenerator(m, mid_blocks=4, top_k=2)
    c = g.cache
    expect = 2 * m.config.num_layers * c.pool_tokens * m.config.dim * 4
    assert c.nbytes == expect
    naive = StreamingGenerator(m, mid_blocks=4, top_k=2, cache="naive")
    sizes = []
    for _ in naive.stream(_text(m), 18):
        sizes.append(naive.cache.nbytes)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # the naive cache grows


def test_config_errors():
    CacheConfig(chunk_frames=3, sink_frames=2, recent_frames=5)  # frames of any count (#13)
    with pytest.raises(ValueError, match="window"):
        CacheConfig(chunk_frames=3, sink_frames=3, recent_frames=12, positions="absolute",
                    max_frames_rope=16)
    with pytest.raises(ValueError, match="positions"):
        CacheConfig(positions="rope")
    with pytest.raises(ValueError, match="max_frames_rope"):
        CacheConfig(chunk_frames=3, sink_frames=3, recent_frames=600, mid_blocks=200, top_k=150)
    with pytest.raises(ValueError, match="mid_evict"):
        CacheConfig(mid_evict="random")
    m = _model()
    with pytest.raises(ValueError, match="backend"):
        StreamingGenerator(m, backend="cuda-graphs")
    cache = _cache(m)
    with pytest.raises(RuntimeError, match="begin_chunk"):
        cache.attend(0, None, None, None, (3, 4, 4))
    cache.begin_chunk(3)
    with pytest.raises(RuntimeError, match="end_chunk"):
        cache.begin_chunk(3)
    with pytest.raises(RuntimeError, match="never wrote"):
        cache.end_chunk()


def test_deprecated_backend_argument_still_chooses_the_cache():
    m = _model(num_layers=1)
    text = _text(m)
    kw = dict(chunk_frames=3, sink_frames=3, recent_frames=3, mid_blocks=2, top_k=1, seed=2,
              timesteps=(1000,))
    for backend, cache, cls in (("fused", "bounded", StreamingKVCache), ("reference", "naive", NaiveKVCache)):
        with pytest.warns(DeprecationWarning, match=f"cache={cache!r}"):
            old = StreamingGenerator(m, backend=backend, **kw)
        assert type(old.cache) is cls
        new = StreamingGenerator(m, cache=cache, **kw)
        assert torch.equal(old.generate(text, 12), new.generate(text, 12))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="contradicts"):
        StreamingGenerator(m, backend="fused", cache="naive")
    with pytest.raises(ValueError, match="cache must be one of"):
        StreamingGenerator(m, cache="fused")


def test_generator_keeps_a_forced_backend():
    """Kernel choice is use_backend's alone: forced to a backend that cannot run CPU tensors, the
    generator must fail rather than quietly run another one."""
    m = _model(num_layers=1)
    g = StreamingGenerator(m, mid_blocks=0)
    with vidstream.use_backend("cuda"), pytest.raises(ValueError, match="'cuda' cannot run"):
        g.generate(_text(m), 3)


def test_naive_cache_is_a_cache_protocol_twin():
    c = NaiveKVCache(num_layers=2, config=CacheConfig(), frame_shape=(4, 4))
    assert c.nbytes == 0
    assert vidstream.StreamingKVCache is StreamingKVCache


def test_selection_once_per_chunk_and_layer(monkeypatch):
    m = _model()
    calls = []
    real = bounded_cache.select_blocks

    def counting(q, *a, **kw):
        calls.append(q.shape)
        return real(q, *a, **kw)

    monkeypatch.setattr(bounded_cache, "select_blocks", counting)
    g = StreamingGenerator(m, chunk_frames=3, sink_frames=3, recent_frames=3, mid_blocks=3, top_k=1)
    g.generate(_text(m), 18)  # chunks 0..5; mid holds >1 block (so selection runs) from chunk 4 on
    assert len(calls) == 2 * m.config.num_layers


def test_warped_timesteps_are_self_forcing_schedule():
    got = warp_timesteps([1000, 750, 500, 250], 5.0)
    assert got == pytest.approx([1000.0, 937.5, 833.3333333, 625.0])


def test_generator_equals_full_recompute_self_forcing_loop():
    """Self-Forcing semantics without a cache: every step of chunk n runs the whole sequence
    (clean chunks 0..n-1 at t = 0, the current noisy chunk at t_i) through chunk_attention. The
    streaming generator, with nothing evicted, must give the same video."""
    m = _model()
    C, frames, seed = 3, 9, 11
    text = _text(m)
    streamed = StreamingGenerator(m, chunk_frames=C, sink_frames=3, recent_frames=6, mid_blocks=0,
                                  seed=seed).generate(text, frames)
    sigmas = [t / 1000 for t in warp_timesteps([1000, 750, 500, 250], 5.0)]
    gen = torch.Generator().manual_seed(seed)
    text_kv = m.text_kv(text)
    attn = FullSequenceAttention(chunk_frames=C)
    clean = torch.zeros(1, 16, 0, 8, 8)
    with torch.no_grad():
        for _ in range(frames // C):
            shape = (1, 16, C, 8, 8)
            x = torch.randn(shape, generator=gen)
            for i, sigma in enumerate(sigmas):
                seq = torch.cat([clean, x], dim=2)
                t = torch.cat([torch.zeros(clean.shape[2]), torch.full((C,), sigma * 1000)])[None]
                flow = m(seq, t, text_kv, attn)[:, :, -C:]
                x0 = x - sigma * flow
                if i + 1 < len(sigmas):
                    x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(shape, generator=gen)
            clean = torch.cat([clean, x0], dim=2)
    torch.testing.assert_close(streamed, clean, atol=1e-4, rtol=1e-4)


def test_bfloat16_model_and_cache():
    """The GPU configuration's dtype plumbing (bf16 weights and pools, float32 latents) on CPU."""
    m = StreamingDiT("tiny", seed=0, dtype=torch.bfloat16)
    text = _text(m)
    g = StreamingGenerator(m, mid_blocks=2, top_k=1)
    a = g.generate(text, 18)
    assert g.cache.k_pool.dtype == torch.bfloat16 and a.dtype == torch.float32
    b = StreamingGenerator(m, mid_blocks=2, top_k=1, cache="naive").generate(text, 18)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("evict", ["oldest", "lowest"])
def test_mid_eviction_policy(evict):
    m = _model(num_layers=1)
    cache = _cache(m, chunk_frames=2, sink_frames=0, recent_frames=2, mid_blocks=2, top_k=1,
                   mid_evict=evict)
    text_kv = m.text_kv(_text(m))

    def chunk():
        cache.begin_chunk(2)
        m(torch.randn(1, 16, 2, 8, 8), 0.0, text_kv, cache)
        cache.end_chunk()

    with torch.no_grad():
        for _ in range(4):  # chunks 0, 1 evicted into mid: mid is full with two blocks
            chunk()
        oldest, newest = cache.mid_order[0]
        cache.mid_score[0][oldest], cache.mid_score[0][newest] = 1.0, 0.1
        chunk()  # evicts chunk 2 into mid: one block must go
    survivor = newest if evict == "oldest" else oldest
    assert cache.mid_order[0][0] == survivor and len(cache.mid_order[0]) == 2


class _IdentityCompressor:
    """Keeps an evicted chunk whole: mid blocks are then ordinary full-resolution chunks."""

    def __call__(self, k, v, *, grid, frame_offset=0, **_):
        return k, v

    def mid_tokens(self, grid):
        return grid[0] * grid[1] * grid[2]


@pytest.mark.parametrize("mid_blocks", [1, 2])
def test_mid_memory_with_identity_compressor_equals_longer_window(mid_blocks):
    """An oracle independent of the cache's position policy: with no sink, every mid block
    active, oldest-first eviction and a compressor that keeps chunks whole, the three partitions
    are one sliding window, so streaming must equal chunk_attention with
    window_frames = mid_blocks * chunk + recent + chunk."""
    m = _model()
    C, R, frames = 3, 3, 27
    window = mid_blocks * C + R + C
    full, streamed, cache = _full_and_streamed(m, frames, window, compressor=_IdentityCompressor(),
                                               chunk_frames=C, sink_frames=0, recent_frames=R,
                                               mid_blocks=mid_blocks, top_k=None, mid_evict="oldest")
    assert cache.max_position == window - 1
    torch.testing.assert_close(streamed, full, atol=5e-5, rtol=1e-5)
