"""Training through the kernels (issue #14): a Self-Forcing-style step on the tiny StreamingDiT
gives the same parameter gradients on the kernel backends as on the reference backend.

The step, as Self-Forcing trains its generator: roll out 4 chunks of 2 frames autoregressively
through the bounded KV cache (a 2-frame sink, a 2-frame window, 2 compressed mid blocks of which
the top 1 is selected: by the 4th chunk every partition is in use), every denoising step but the
last of each chunk under ``torch.no_grad()``, the last with gradients (the cache's earlier keys
are constants: only the current chunk's q, k, v carry a graph); the clean prediction of each
chunk is written to the cache by a no-grad context pass (detached, at timestep 0), and a loss on
the generated latents is backpropagated.

Tolerance: float32 throughout. The forward kernels differ from the reference by float32
rounding (about 1e-7 relative per op), which the rollout carries through 4 chunks x 2 layers x
3 passes; the backward adds its own rounding. A gradient is compared as the relative norm
||g - g_ref|| / ||g_ref|| per parameter tensor, <= 1e-4: 1,000x float32's epsilon (room for the
accumulated rounding), while a missing or wrong term (a dropped lse or pool gradient, a
mis-rotated key) moves it by O(1e-2 .. 1).
"""

from __future__ import annotations

import time

import pytest
import torch
from numerics import require

import vidstream
from vidstream import backend
from vidstream.streaming.generator import warp_timesteps

CHUNKS = 4
RTOL = 1e-4


def _step(backend_name: str | None, *, chunks=CHUNKS, chunk_frames=2, timesteps=(1000, 500)):
    """One Self-Forcing-style generator step; returns (loss, {param name: grad})."""
    model = vidstream.StreamingDiT("tiny", seed=0)
    gen = vidstream.StreamingGenerator(model, chunk_frames=chunk_frames, sink_frames=2,
                                       recent_frames=2, mid_blocks=2, top_k=1,
                                       timesteps=timesteps, shift=1.0)
    mc = model.config
    g = torch.Generator().manual_seed(1234)
    text = torch.randn(1, mc.text_len, mc.text_dim, generator=g)
    noise = [torch.randn(1, mc.in_dim, chunk_frames, *mc.latent_hw, generator=g)
             for _ in range(chunks)]
    renoise = [torch.randn(1, mc.in_dim, chunk_frames, *mc.latent_hw, generator=g)
               for _ in range(chunks * len(timesteps))]
    sigmas = [t / 1000.0 for t in warp_timesteps(timesteps, 1.0)]
    ctx = vidstream.use_backend(backend_name) if backend_name else _null()
    with ctx:
        cache = gen.cache
        cache.reset()
        text_kv = model.text_kv(text)
        outs = []
        for c in range(chunks):
            x = noise[c]
            cache.begin_chunk(chunk_frames)
            with torch.no_grad():
                for i, sigma in enumerate(sigmas[:-1]):
                    x0 = x - sigma * model(x, sigma * 1000.0, text_kv, cache)
                    nxt = sigmas[i + 1]
                    x = (1 - nxt) * x0 + nxt * renoise[c * len(sigmas) + i]
            sigma = sigmas[-1]
            x0 = x - sigma * model(x, sigma * 1000.0, text_kv, cache)  # with gradients
            outs.append(x0)
            with torch.no_grad():
                model(x0.detach(), 0.0, text_kv, cache)  # the context pass writes the cache
            cache.end_chunk()
        video = torch.cat(outs, dim=2)
        target = torch.linspace(-1, 1, video.numel()).view_as(video)
        loss = ((video - target) ** 2).mean()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# The Triton interpreter runs the whole model (~10x slower): a shorter rollout for it (2 chunks,
# one denoising step each, the one with gradients: sink and window, no mid block yet; the full
# rollout runs on the C++ and torch backends).
SHORT = {"chunks": 2, "timesteps": (1000,)}
_reference: dict = {}


def _reference_step(short: bool):
    if short not in _reference:
        _reference[short] = _step("reference", **(SHORT if short else {}))
    return _reference[short]


@pytest.fixture(scope="module")
def reference_step():
    return _reference_step(False)


def _compare(got, want):
    loss, grads = got
    loss_ref, grads_ref = want
    assert grads.keys() == grads_ref.keys()
    assert len(grads_ref) > 10
    torch.testing.assert_close(loss, loss_ref, rtol=RTOL, atol=0)
    worst = 0.0
    for n, g in grads_ref.items():
        err = float((grads[n] - g).norm() / g.norm().clamp_min(1e-30))
        worst = max(worst, err)
        assert err <= RTOL, f"{n}: relative gradient error {err:.2e} > {RTOL}"
    return worst


@pytest.mark.parametrize("backend_name", [None, "cpu", "torch", "triton"])
def test_self_forcing_step_gradients_match_the_reference(backend_name):
    """``None``: the defaults (the C++ kernels where they have a backward here, else PyTorch's
    own ops); a named backend: forced for every op. A kernel backend that lacks a backward for
    an op the step needs is skipped with the reason (forcing it would refuse, by design)."""
    if backend_name in ("cpu", "triton"):
        require(backend_name, "chunk_attention", "cpu", torch.float32)
        for op in ("rope3d", "cached_attention"):
            why = backend.op(op).no_backward(backend_name)
            if why is not None:
                pytest.skip(f"{backend_name}: {op} has no backward here ({why})")
        # the in-place cache writes have no backward on any kernel; the step never needs one
        # (the cache is detached), so forcing the kernel backend must still run it
    short = backend_name == "triton"
    t0 = time.perf_counter()
    got = _step(backend_name, **(SHORT if short else {}))
    worst = _compare(got, _reference_step(short))
    print(f"{backend_name or 'default'}: worst relative gradient error {worst:.2e} "
          f"({time.perf_counter() - t0:.1f} s)")


def test_gradients_reach_every_trained_parameter(reference_step):
    """The last denoising step of each chunk carries the graph: every parameter of the model
    (self-attention, cross-attention, FFN, time embedding, head) gets a non-zero gradient."""
    _, grads = reference_step
    model = vidstream.StreamingDiT("tiny", seed=0)
    names = {n for n, _ in model.named_parameters()}
    assert names == set(grads)
    assert all(float(g.abs().max()) > 0 for g in grads.values())
