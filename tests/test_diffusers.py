"""diffusers as a client: a random WanTransformer3DModel converted with StreamingDiT.from_diffusers
gives diffusers' own one-chunk bidirectional forward, and streams through the bounded cache.

What differs between the two and why it still matches (float32):
- names: diffusers' block ``norm2`` is Wan's cross-attention ``norm3``; ``condition_embedder.*``,
  ``attn1/attn2.to_*``, ``ffn.net.*``, ``proj_out``, ``scale_shift_table`` are renamed;
- RoPE: diffusers' real-valued interleaved rotation with band sizes 2 * (head_dim // 6) for h and
  w is Wan's complex rotation with the same bands; its ``rope_max_seq_len`` (1024) table only
  limits positions, which vidstream computes without a table;
- timestep embedding: diffusers' ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`` is
  Wan's [cos, sin] embedding, but formed in float32 where Wan (and vidstream) use float64: the one
  difference that cannot match exactly (about 1e-6 relative at t near 1000);
- text: diffusers' transformer attends to the text it is given, its pipeline zero-pads prompts
  to 512 tokens first; vidstream pads to ``text_len`` itself (``from_diffusers``: 512 by default).
"""

import pytest
import torch

from vidstream.streaming import FullSequenceAttention, StreamingDiT, StreamingGenerator

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
              out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
TEXT_LEN = 20


def _random_diffusers(**over):
    m = diffusers.WanTransformer3DModel(**{**CONFIG, **over}).eval()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    with torch.no_grad():  # norms' ones and biases' zeros too: a swapped name must show
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _forward_both(d, m, x, t, text):
    with torch.no_grad():
        want = d(x, t, text, return_dict=False)[0]
        got = m(x, t, m.text_kv(text), FullSequenceAttention(chunk_frames=x.shape[2]))
    return got, want


@pytest.mark.parametrize("frames,hw", [(3, (6, 8)), (2, (4, 10))])
def test_same_forward_as_diffusers(frames, hw):
    d = _random_diffusers()
    m = StreamingDiT.from_diffusers(d, text_len=TEXT_LEN, latent_hw=hw)
    assert (m.config.dim, m.config.num_heads, m.config.head_dim, m.config.text_len) == (24, 2, 12, 20)
    x = torch.randn(2, 16, frames, *hw)
    t = torch.tensor([937.5, 250.0])  # per sample, as diffusers takes it
    text = torch.randn(2, TEXT_LEN, 32)
    got, want = _forward_both(d, m, x, t, text)
    assert _rel_err(got, want) <= 1e-5
    # The check can fail: one cross-attention norm weight negated is > 100x the tolerance off.
    with torch.no_grad():
        m.blocks[1].norm3.weight.mul_(-1)
    assert _rel_err(_forward_both(d, m, x, t, text)[0], want) > 1e-3


def test_the_timestep_embedding_is_the_only_inexact_part():
    """With diffusers' float32 sinusoidal timestep embedding replaced by Wan's float64 one, the two
    forwards agree to float32 rounding."""
    d = _random_diffusers()
    m = StreamingDiT.from_diffusers(d, text_len=TEXT_LEN, latent_hw=(6, 8))
    proj = d.condition_embedder.timesteps_proj
    half = proj.num_channels // 2

    def wan_embedding(t):
        angle = t.double()[:, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        return torch.cat([angle.cos(), angle.sin()], dim=1).float()

    proj.forward = wan_embedding
    x, text = torch.randn(2, 16, 3, 6, 8), torch.randn(2, TEXT_LEN, 32)
    got, want = _forward_both(d, m, x, torch.tensor([999.0, 937.5]), text)
    assert _rel_err(got, want) <= 2e-6


def test_short_text_is_padded_as_the_pipeline_does():
    d = _random_diffusers()
    m = StreamingDiT.from_diffusers(d, text_len=TEXT_LEN, latent_hw=(6, 8))
    x, t = torch.randn(1, 16, 3, 6, 8), torch.tensor([500.0])
    text = torch.randn(1, 7, 32)
    padded = torch.nn.functional.pad(text, (0, 0, 0, TEXT_LEN - 7))  # WanPipeline's zero padding
    with torch.no_grad():
        want = d(x, t, padded, return_dict=False)[0]
        got = m(x, t, m.text_kv(text), FullSequenceAttention(chunk_frames=3))
    assert _rel_err(got, want) <= 1e-5


def test_from_a_saved_folder_and_from_pretrained(tmp_path):
    d = _random_diffusers()
    d.save_pretrained(str(tmp_path))
    a = StreamingDiT.from_diffusers(str(tmp_path), latent_hw=(6, 8))
    b = StreamingDiT.from_pretrained(str(tmp_path), latent_hw=(6, 8))  # recognised as diffusers
    c = StreamingDiT.from_diffusers(d, latent_hw=(6, 8))
    assert a.config == b.config == c.config and a.config.text_len == 512
    sc = c.state_dict()
    for m in (a, b):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sc[k]), k


def test_converted_model_streams_through_the_bounded_cache():
    d = _random_diffusers()
    m = StreamingDiT.from_diffusers(d, text_len=TEXT_LEN, latent_hw=(8, 8))  # 4 x 4 tokens a frame
    g = StreamingGenerator(m, chunk_frames=2, sink_frames=2, recent_frames=2, mid_blocks=2, top_k=1,
                           timesteps=(1000, 500))
    chunks = list(g.stream(torch.randn(1, TEXT_LEN, 32), num_frames=11))
    assert [c.shape for c in chunks] == [(1, 16, 2, 8, 8)] * 5 + [(1, 16, 1, 8, 8)]
    assert all(torch.isfinite(c).all() for c in chunks)


def test_image_to_video_and_other_variants_are_refused():
    i2v = diffusers.WanTransformer3DModel(**{**CONFIG, "image_dim": 8, "added_kv_proj_dim": 24})
    with pytest.raises(ValueError, match="image_dim=8: image-to-video Wan models are not supported"):
        StreamingDiT.from_diffusers(i2v)
    with pytest.raises(ValueError, match=r"patch_size=\(1, 4, 4\)"):
        StreamingDiT.from_diffusers(diffusers.WanTransformer3DModel(**{**CONFIG, "patch_size": (1, 4, 4)}))
    with pytest.raises(TypeError, match="must be a diffusers WanTransformer3DModel"):
        StreamingDiT.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="existing folder"):
        StreamingDiT.from_diffusers("/nonexistent/wan")
