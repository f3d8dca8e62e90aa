"""StreamingGenerator's Self-Forcing controls: context_noise (and context_renoise), initial_latent,
noise= (a tensor or a torch.Generator), the documented draw order, positions=."""

from dataclasses import replace

import pytest
import torch

from vidstream.streaming import FullSequenceAttention, StreamingDiT, StreamingGenerator, warp_timesteps
from vidstream.streaming.model import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

C = 3
SHAPE = (1, 16, C, 8, 8)


@pytest.fixture(scope="module")
def model():
    m = StreamingDiT(replace(PRESETS["tiny"], num_layers=1), seed=3)
    with torch.no_grad():  # random weights barely depend on t: make the cached frames' t matter
        for layer in m.time_embedding:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(20)
    return m


def _gen(m, **kw):
    # sink + window cover the whole test video: nothing is evicted, so the full recompute is exact.
    return StreamingGenerator(m, chunk_frames=C, sink_frames=3, recent_frames=6, mid_blocks=0, **kw)


def _oracle(m, text, frames, *, seed, context_noise=0.0, renoise=False, prefix=None, noise=None,
            timesteps=(1000, 750, 500, 250), shift=5.0):
    """Self-Forcing's loop with no cache: every pass runs the whole history through
    chunk_attention (prefix chunks clean at t = 0, generated ones at t = context_noise, the
    current chunk noisy), drawing in the documented order."""
    sigmas = [t / 1000 for t in warp_timesteps(timesteps, shift)]
    gen = torch.Generator().manual_seed(seed)
    text_kv = m.text_kv(text)
    attn = FullSequenceAttention(chunk_frames=C)
    hist = torch.zeros(1, 16, 0, 8, 8) if prefix is None else prefix
    t_hist = torch.zeros(hist.shape[2])
    out = []
    with torch.no_grad():
        for n in range(frames // C):
            x = torch.randn(SHAPE, generator=gen) if noise is None else noise[:, :, n * C:(n + 1) * C]
            for i, sigma in enumerate(sigmas):
                seq = torch.cat([hist, x], dim=2)
                t = torch.cat([t_hist, torch.full((C,), sigma * 1000)])[None]
                x0 = x - sigma * m(seq, t, text_kv, attn)[:, :, -C:]
                if i + 1 < len(sigmas):
                    x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(SHAPE, generator=gen)
            ctx = x0
            if renoise and context_noise > 0:
                c = context_noise / 1000
                ctx = (1 - c) * x0 + c * torch.randn(SHAPE, generator=gen)
            hist = torch.cat([hist, ctx], dim=2)
            t_hist = torch.cat([t_hist, torch.full((C,), float(context_noise))])
            out.append(x0)
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("context_noise,renoise", [(0.0, False), (250.0, False), (250.0, True)])
def test_context_noise_is_the_cache_write_timestep(model, context_noise, renoise):
    text = torch.randn(1, 5, model.config.text_dim)
    seed = int(torch.randint(0, 2**31, ()))
    got = _gen(model, seed=seed, context_noise=context_noise, context_renoise=renoise).generate(text, 9)
    want = _oracle(model, text, 9, seed=seed, context_noise=context_noise, renoise=renoise)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if context_noise:  # the check can fail: the oracle without the control is far away
        plain = _oracle(model, text, 9, seed=seed, context_noise=context_noise if renoise else 0)
        assert (plain - want).abs().max() > 0.05


def test_context_noise_changes_only_later_chunks(model):
    text = torch.randn(1, 5, model.config.text_dim)
    a = _gen(model, seed=1).generate(text, 6)
    b = _gen(model, seed=1, context_noise=500).generate(text, 6)
    torch.testing.assert_close(a[:, :, :C], b[:, :, :C], atol=0, rtol=0)  # nothing cached yet
    assert (a[:, :, C:] - b[:, :, C:]).abs().max() > 0.1


def test_initial_latent_is_a_clean_prefix_and_noise_tensor_is_used(model):
    text = torch.randn(1, 5, model.config.text_dim)
    prefix = torch.randn(1, 16, 2 * C, 8, 8)
    noise = torch.randn(1, 16, 6, 8, 8)
    seed = int(torch.randint(0, 2**31, ()))
    g = _gen(model, seed=seed, context_noise=100)
    chunks = list(g.stream(text, 6, noise=noise, initial_latent=prefix))
    assert [c.shape[2] for c in chunks] == [C, C]  # the prefix is not yielded
    want = _oracle(model, text, 6, seed=seed, context_noise=100, prefix=prefix, noise=noise)
    torch.testing.assert_close(torch.cat(chunks, dim=2), want, atol=1e-4, rtol=1e-4)
    no_prefix = _oracle(model, text, 6, seed=seed, context_noise=100, noise=noise)
    assert (no_prefix - want).abs().max() > 0.05
    video = g.generate(text, 6, noise=noise, initial_latent=prefix)  # Self-Forcing returns it
    assert torch.equal(video[:, :, :2 * C], prefix)
    torch.testing.assert_close(video[:, :, 2 * C:], want, atol=1e-4, rtol=1e-4)


def test_noise_generator_draws_like_seed(model):
    text = torch.randn(1, 5, model.config.text_dim)
    g = _gen(model, seed=5)
    by_seed = g.generate(text, 4)  # a partial last chunk too
    by_gen = g.generate(text, 4, noise=torch.Generator().manual_seed(5))
    torch.testing.assert_close(by_seed, by_gen, atol=0, rtol=0)
    other = g.generate(text, 4, noise=torch.Generator().manual_seed(6))
    assert not torch.equal(by_seed, other)


def test_first_chunk_noise_is_the_documented_first_draw(model):
    """Draw 1 of chunk 0 is the starting noise: giving it as a tensor (and the same seed for the
    later draws, which then start one draw earlier) changes chunk 0 only through those draws."""
    text = torch.randn(1, 5, model.config.text_dim)
    g = StreamingGenerator(model, chunk_frames=C, sink_frames=0, recent_frames=0, mid_blocks=0,
                           timesteps=(1000,), seed=9)  # one step: no re-noising draw at all
    first = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(g.generate(text, C), g.generate(text, C, noise=first), atol=0, rtol=0)


def test_positions_pass_to_the_cache_config(model):
    assert _gen(model).config.positions == "relative"
    assert _gen(model, positions="absolute").config.positions == "absolute"


def test_bad_controls(model):
    text = torch.randn(1, 5, model.config.text_dim)
    g = _gen(model)
    with pytest.raises(ValueError, match=r"noise must be a floating tensor .*\[1, 16, 6, 8, 8\]"):
        next(g.stream(text, 6, noise=torch.randn(1, 16, 5, 8, 8)))
    with pytest.raises(TypeError, match="noise must be None, a torch.Generator or a tensor"):
        next(g.stream(text, 6, noise=3))
    with pytest.raises(ValueError, match="initial_latent must be .* multiple of chunk_frames=3"):
        next(g.stream(text, 6, initial_latent=torch.randn(1, 16, 2, 8, 8)))
    with pytest.raises(ValueError, match="initial_latent must be"):
        next(g.stream(text, 6, initial_latent=torch.randn(1, 16, 3, 8, 6)))
    for bad in (-1, 1001, float("nan"), True, "0"):
        with pytest.raises(ValueError, match="context_noise must be a timestep in"):
            _gen(model, context_noise=bad)
    with pytest.raises(TypeError, match="context_renoise must be True or False"):
        _gen(model, context_renoise=1)
    with pytest.raises(ValueError, match="positions must be 'relative' or 'absolute'"):
        _gen(model, positions="rope")
