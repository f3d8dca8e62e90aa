"""The bounded cache's hot loop reads no range metadata back to the host: once a chunk's metadata
is prepared (its first pass), a denoising pass through every layer calls no Tensor.tolist / item /
cpu / numpy, converts no tensor to a Python bool or number, and hands the ops prepared
TokenRanges / FrameSlots only (never values they would have to check)."""

import pytest
import torch

import vidstream
from vidstream.ops import checks
from vidstream.streaming.bounded_cache import StreamingKVCache
from vidstream.streaming.config import CacheConfig
from vidstream.streaming.model import StreamingDiT

HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _forbid_host_reads(monkeypatch):
    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside a denoising pass")
        return fail

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("mid_blocks,top_k", [(0, None), (2, 1)])
def test_denoising_pass_is_host_sync_free(monkeypatch, mid_blocks, top_k):
    model = StreamingDiT("tiny", seed=0).eval()
    cfg = model.config
    cache = StreamingKVCache(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_heads,
                             head_dim=cfg.head_dim, frame_shape=cfg.frame_shape,
                             config=CacheConfig(chunk_frames=2, sink_frames=2, recent_frames=2,
                                                mid_blocks=mid_blocks, top_k=top_k))
    text_kv = model.text_kv(torch.randn(1, cfg.text_len, cfg.text_dim))
    H, W = cfg.latent_hw
    raw_inputs = []
    real_ranges = checks.ranges

    def spy(r, *args, **kwargs):
        if not isinstance(r, vidstream.TokenRanges):
            raw_inputs.append(r)
        return real_ranges(r, *args, **kwargs)

    with torch.no_grad():
        # Enough chunks that the window wraps and (with mid_blocks) blocks are compressed and
        # selected; each chunk's first pass prepares its metadata, the second is checked.
        for _ in range(6):
            x = torch.randn(1, cfg.in_dim, 2, H, W)
            cache.begin_chunk(2)
            model(x, 1000.0, text_kv, cache)
            with monkeypatch.context() as m:
                _forbid_host_reads(m)
                m.setattr(checks, "ranges", spy)
                model(x, 500.0, text_kv, cache)
            cache.end_chunk()
    assert raw_inputs == []
    if mid_blocks:
        assert cache.num_mid > 0


def test_the_patch_catches_an_unprepared_call(monkeypatch):
    """The same patch fails the validating path, so the test above can fail."""
    q = torch.randn(1, 4, 2, 8)
    kp = torch.randn(1, 10, 2, 8)
    _forbid_host_reads(monkeypatch)
    with pytest.raises(AssertionError, match="inside a denoising pass"):
        vidstream.cached_attention(q, kp, kp, torch.tensor([[0, 4]], dtype=torch.int32))
