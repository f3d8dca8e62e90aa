"""Every public op traces under torch.compile(fullgraph=True) on every backend that can run here,
the reference included, with index arguments given as tensors (values the tracer cannot read) and
prepared; compiled equals eager. Value checks that cannot run while tracing become asserts in the
graph: bad values still fail before any kernel runs."""

import pytest
import torch

import vidstream
from tests.numerics import require

OPS = ("rope3d", "rope3d_shift_", "rope3d_store_", "chunk_attention", "cached_attention",
       "select_blocks", "lowrank_cached_attention")


def _cases(op):
    g = torch.Generator().manual_seed(7)

    def r(*s):
        return torch.randn(*s, generator=g)

    ranges = torch.tensor([[9, 14], [0, 4], [6, 6]], dtype=torch.int32)
    if op == "rope3d":
        return lambda x: vidstream.rope3d(x, grid=(2, 2, 3), frame_offset=5), (r(1, 12, 2, 16),)
    if op == "rope3d_shift_":
        delta = torch.tensor([1.5, -2.0, 3.0], dtype=torch.float64)
        return (lambda p, rg, d: vidstream.rope3d_shift_(p.clone(), rg, d),
                (r(2, 16, 2, 16), ranges, delta))
    if op == "rope3d_store_":
        slots = torch.tensor([8, 0], dtype=torch.int32)
        pos = torch.tensor([4.0, 5.0], dtype=torch.float64)

        def store(kp, vp, k, v, s, p):
            kp, vp = kp.clone(), vp.clone()
            return vidstream.rope3d_store_(kp, vp, k, v, s, p, grid=(2, 2, 2))
        return store, (r(1, 20, 2, 16), r(1, 20, 2, 8), r(1, 8, 2, 16), r(1, 8, 2, 8), slots, pos)
    if op == "chunk_attention":
        return (lambda q, k, v: vidstream.chunk_attention(
            q, k, v, frame_tokens=3, chunk_frames=2, sink_frames=1, window_frames=4,
            return_lse=True), (r(1, 18, 4, 16), r(1, 18, 2, 16), r(1, 18, 2, 16)))
    if op == "cached_attention":
        return (lambda q, k, v, rg: vidstream.cached_attention(q, k, v, rg, return_lse=True),
                (r(1, 5, 4, 16), r(1, 16, 2, 16), r(1, 16, 2, 16), ranges))
    if op == "select_blocks":
        return (lambda q, k, rg: (vidstream.select_blocks(q, k, rg, 2, query_stride=2),
                                  vidstream.select_blocks(q, k, rg, 2, score="max")),
                (r(1, 6, 4, 16), r(1, 16, 2, 16), ranges))
    if op == "lowrank_cached_attention":
        return (lambda q, c, wk, wv, rg, kr: vidstream.lowrank_cached_attention(
            q, c, wk, wv, rg, k_r_pool=kr), (r(1, 3, 2, 12), r(1, 16, 8), r(2, 8, 8), r(2, 8, 6),
                                             ranges, r(1, 16, 4)))
    raise AssertionError(op)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("op", OPS)
def test_public_op_compiles_fullgraph(backend, op):
    require(backend, op, "cpu", torch.float32)
    fn, args = _cases(op)
    with vidstream.use_backend(backend):
        want = fn(*args)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_graph_still_refuses_bad_values(backend):
    """Ranges out of bounds, overlapping ranges and NaN offsets fail at run time of the compiled
    graph, before the pool is touched."""
    require(backend, "rope3d_shift_", "cpu", torch.float32)

    def shift(pool, ranges, delta):
        return vidstream.rope3d_shift_(pool, ranges, delta)

    torch._dynamo.reset()
    compiled = torch.compile(shift, fullgraph=True, backend="aot_eager")
    good = torch.tensor([[0, 4]], dtype=torch.int32)
    one, two = torch.ones(1, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for ranges, delta in ((torch.tensor([[0, 40]], dtype=torch.int32), one),
                          (torch.tensor([[0, 4], [2, 6]], dtype=torch.int32), two),
                          (good, torch.tensor([float("nan")], dtype=torch.float64))):
        pool = torch.randn(1, 10, 2, 16)
        before = pool.clone()
        with vidstream.use_backend(backend), pytest.raises(RuntimeError, match="ranges|delta_frames"):
            compiled(pool, ranges, delta)
        assert torch.equal(pool, before)


def test_streaming_denoising_pass_compiles_whole():
    """With the chunk's metadata prepared (its first pass), one denoising pass of the tiny
    StreamingDiT through the bounded cache traces with no graph break and, compiled by inductor,
    equals eager."""
    from vidstream.streaming.bounded_cache import StreamingKVCache
    from vidstream.streaming.config import CacheConfig

    model = vidstream.StreamingDiT("tiny", seed=0).eval()
    cfg = model.config
    cache = StreamingKVCache(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_heads,
                             head_dim=cfg.head_dim, frame_shape=cfg.frame_shape,
                             config=CacheConfig(chunk_frames=2, sink_frames=2, recent_frames=2,
                                                mid_blocks=2, top_k=1))
    text_kv = model.text_kv(torch.randn(1, cfg.text_len, cfg.text_dim))
    H, W = cfg.latent_hw

    def one_pass(x, t):
        return model(x, t, text_kv, cache)

    with torch.no_grad():
        for chunk in range(4):  # the fourth chunk attends sink, a selected mid block and the ring
            x = torch.randn(1, cfg.in_dim, 2, H, W)
            cache.begin_chunk(2)
            model(x, 1000.0, text_kv, cache)
            if chunk == 3:
                t = torch.tensor(500.0)
                torch._dynamo.reset()
                explained = torch._dynamo.explain(one_pass)(x, t)
                assert explained.graph_break_count == 0, explained.break_reasons
                want = one_pass(x, t)
                got = torch.compile(one_pass, fullgraph=True)(x, t)  # inductor
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            cache.end_chunk()


def test_generator_compile_equals_eager():
    """StreamingGenerator(compile=True) through sink, ring, mid blocks and a partial last chunk
    (a graph per cache layout) gives eager's video."""
    model = vidstream.StreamingDiT("tiny", seed=0).eval()
    cfg = model.config
    text = torch.randn(1, cfg.text_len, cfg.text_dim)
    kw = dict(chunk_frames=2, sink_frames=2, recent_frames=2, mid_blocks=2, top_k=1)
    want = vidstream.StreamingGenerator(model, **kw).generate(text, 9)
    torch._dynamo.reset()
    gen = vidstream.StreamingGenerator(model, compile=True, compile_options={"backend": "aot_eager"},
                                       **kw)
    got = gen.generate(text, 9)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generator_compile_arguments():
    model = vidstream.StreamingDiT("tiny", seed=0).eval()
    with pytest.raises(TypeError, match="compile"):
        vidstream.StreamingGenerator(model, compile="yes")
    with pytest.raises(ValueError, match="compile=True needs cache='bounded'"):
        vidstream.StreamingGenerator(model, compile=True, cache="naive")
    with pytest.raises(TypeError, match="compile_options"):
        vidstream.StreamingGenerator(model, compile=True, compile_options="max-autotune")
