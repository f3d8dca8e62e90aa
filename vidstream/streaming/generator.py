"""``StreamingGenerator``: Self-Forcing's chunk-by-chunk generation loop (docs/spec.md §6).

Per chunk of ``chunk_frames`` latent frames: a few flow-matching denoising steps (timesteps 1000,
750, 500, 250 warped with shift 5.0; the model predicts the flow ``noise - x0``, so
``x0 = x_t - sigma * flow``), re-noising the prediction to the next step's noise level in
between; then one more pass over the clean chunk at timestep ``context_noise`` (default 0) that
leaves its keys and values in the cache. Each finished chunk is yielded as soon as it is done.

``cache="bounded"`` keeps the ``StreamingKVCache`` (fixed pool, vidstream ops);
``cache="naive"`` the ``NaiveKVCache`` (growing history, clone / re-rotate / concatenate each
pass, eager reference ops): the baseline to validate and time against. The same seed draws the
same noise with both. Which kernels the vidstream ops run is not the generator's business: that
is ``vidstream.use_backend`` / ``VIDSTREAM_BACKEND``, which the generator leaves as it finds it.

Noise draw order (``noise=None``: a ``torch.Generator`` on the model's device seeded with
``seed``; ``noise=<torch.Generator>``: that generator, in the same order). For each generated
chunk ``[B, 16, F, H, W]`` in turn, every draw of that shape:

1. the chunk's starting noise (taken from the ``noise`` tensor's frames instead when ``noise`` is
   a ``[B, 16, num_frames, H, W]`` tensor; then steps 2 and 3 draw from the ``seed`` generator);
2. after each denoising step but the last, the fresh noise of the re-noising;
3. with ``context_renoise=True`` and ``context_noise > 0``, the noise mixed into the clean chunk
   before the cache-write pass.

Nothing is drawn for an ``initial_latent`` prefix. Self-Forcing itself draws its starting noise
for the whole video up front (``[B, F, 16, H, W]``, frames before channels) and the re-noising from
torch's global generator: pass ``noise=sf_noise.transpose(1, 2)`` to start from the same noise.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Optional

import torch

from ..ops import checks
from .bounded_cache import StreamingKVCache
from .config import CacheConfig
from .model import StreamingDiT
from .naive_cache import NaiveKVCache
from .rolling_cache import RollingBufferCache

CACHES = {"bounded": StreamingKVCache, "naive": NaiveKVCache, "rolling": RollingBufferCache}
# The generator's former ``backend=`` names, kept for one release: they chose the cache.
LEGACY_BACKENDS = {"fused": "bounded", "reference": "naive"}
_RECOMPILE_LIMIT = 64


def cache_kind(cache: Optional[str], backend: Optional[str]) -> str:
    """The cache ``cache`` names, or that the deprecated ``backend`` maps to (default "bounded")."""
    if backend is not None:
        if backend not in LEGACY_BACKENDS:
            raise ValueError(f"backend (deprecated: use cache=) must be one of "
                             f"{tuple(LEGACY_BACKENDS)}, got {backend!r}")
        mapped = LEGACY_BACKENDS[backend]
        warnings.warn(f"StreamingGenerator(backend={backend!r}) is deprecated: use cache={mapped!r} "
                      "(kernels are chosen with vidstream.use_backend / VIDSTREAM_BACKEND)",
                      DeprecationWarning, stacklevel=3)
        if cache is not None and cache != mapped:
            raise ValueError(f"backend={backend!r} (deprecated) means cache={mapped!r}, which "
                             f"contradicts cache={cache!r}: give cache= only")
        cache = mapped
    cache = "bounded" if cache is None else cache
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {tuple(CACHES)}, got {cache!r}")
    return cache


def warp_timesteps(timesteps, shift: float = 5.0, num_train_timesteps: int = 1000) -> list[float]:
    """Self-Forcing's warped denoising steps: step t maps to the shifted flow-matching schedule,
    sigma = shift*s / (1 + (shift - 1)*s) with s = t / 1000; returned as 1000 * sigma."""
    out = []
    for t in timesteps:
        s = float(t) / num_train_timesteps
        out.append(num_train_timesteps * shift * s / (1 + (shift - 1) * s))
    return out


def _check_schedule(timesteps, shift, num_train_timesteps: int = 1000):
    """Denoising steps in (0, num_train_timesteps] and a finite shift > 0: anything else makes
    NaN or a division by zero in the warp, or a video that was never denoised."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (
            math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    try:
        steps = list(timesteps)
    except TypeError:
        checks.fail_type(f"timesteps must be a sequence of numbers, got {timesteps!r}")
    if not steps:
        raise ValueError("timesteps must name at least one denoising step")
    for t in steps:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
                math.isfinite(t) and 0 < t <= num_train_timesteps):
            raise ValueError(f"timesteps must be numbers in (0, {num_train_timesteps}], got "
                             f"{tuple(steps)}")


def _check_context_noise(context_noise, context_renoise) -> None:
    if isinstance(context_noise, bool) or not isinstance(context_noise, (int, float)) or not (
            math.isfinite(context_noise) and 0 <= context_noise <= 1000):
        raise ValueError(f"context_noise must be a timestep in [0, 1000], got {context_noise!r}")
    if not isinstance(context_renoise, bool):
        checks.fail_type(f"context_renoise must be True or False, got {context_renoise!r}")


class StreamingGenerator:
    """Generates a video of any length chunk by chunk in fixed memory.

    ``model``: a ``StreamingDiT``. Cache partitions (latent frames): ``sink_frames``,
    ``recent_frames`` (full resolution, besides the current chunk), ``mid_blocks`` compressed
    blocks of which ``top_k`` are attended (``None``: all), ``mid_evict`` "oldest" or "lowest";
    ``compressor``: mid-block compressor (default ``compressors.default_compressor()``);
    ``cache``: "bounded" or "naive" (module docstring); ``backend``: deprecated alias of
    ``cache`` ("fused" -> "bounded", "reference" -> "naive").

    ``compile=True`` (bounded cache only): every pass of a chunk after its first runs through
    ``torch.compile(fullgraph=True, dynamic=False)`` (``compile_options`` adds or overrides
    keywords, e.g. ``{"mode": "reduce-overhead"}`` for CUDA graphs on a GPU). The first pass stays
    eager because it lays the chunk out (selection, re-rotation, ranges read on the host); the
    later ones only read that layout, so they trace whole. One graph is compiled per layout the
    cache goes through, a handful until the cache is full, then they repeat."""

    def __init__(self, model: StreamingDiT, *, chunk_frames: int = 3, sink_frames: int = 3,
                 recent_frames: int = 6, mid_blocks: int = 8, top_k: Optional[int] = 4,
                 mid_evict: str = "oldest", compressor=None, timesteps=(1000, 750, 500, 250),
                 shift: float = 5.0, cache: Optional[str] = None, seed: int = 0, batch: int = 1,
                 select_stride: int = 8, max_frames_rope: int = 1024, backend: Optional[str] = None,
                 compile: bool = False, compile_options: Optional[dict] = None,
                 context_noise: float = 0.0, context_renoise: bool = False,
                 positions: str = "relative"):
        self.cache_kind = cache_kind(cache, backend)
        if not isinstance(compile, bool):
            checks.fail_type(f"compile must be True or False, got {compile!r}")
        if compile and self.cache_kind != "bounded":
            raise ValueError("compile=True needs cache='bounded': the naive cache grows every "
                             "chunk, so no graph could be reused")
        if compile_options is not None and not isinstance(compile_options, dict):
            checks.fail_type(f"compile_options must be a dict of torch.compile keywords, got "
                             f"{compile_options!r}")
        _check_schedule(timesteps, shift)
        checks.positive_int(batch, "batch")
        checks.positive_int(seed, "seed", minimum=0)
        _check_context_noise(context_noise, context_renoise)
        self.context_noise = float(context_noise)
        self.context_renoise = context_renoise
        self.model = model
        self.seed = seed
        self.batch = batch
        self.sigmas = [t / 1000.0 for t in warp_timesteps(timesteps, shift)]
        self.config = CacheConfig(chunk_frames=chunk_frames, sink_frames=sink_frames,
                                  recent_frames=recent_frames, mid_blocks=mid_blocks, top_k=top_k,
                                  mid_evict=mid_evict, select_stride=select_stride,
                                  max_frames_rope=max_frames_rope, positions=positions)
        mc = model.config
        self.cache = CACHES[self.cache_kind](
            num_layers=mc.num_layers, batch=batch, kv_heads=mc.num_heads, head_dim=mc.head_dim,
            frame_shape=mc.frame_shape, config=self.config, compressor=compressor,
            dtype=model.dtype, device=model.device)
        self._compiled_pass = None
        if compile:
            options = {"fullgraph": True, "dynamic": False, **(compile_options or {})}
            self._compiled_pass = torch.compile(self._pass, **options)

    def _pass(self, x: torch.Tensor, t: torch.Tensor, text_kv: list) -> torch.Tensor:
        return self.model(x, t, text_kv, self.cache)

    def _later_pass(self, x: torch.Tensor, t: float, text_kv: list) -> torch.Tensor:
        """A pass after the chunk's first: compiled when asked. ``t`` goes in as a tensor so that
        the denoising steps share one graph."""
        if self._compiled_pass is None:
            return self._pass(x, t, text_kv)
        t = torch.tensor(t, dtype=torch.float32, device=x.device)
        # A graph per cache layout: more than dynamo's default of 8 before the layouts repeat.
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return self._compiled_pass(x, t, text_kv)

    @torch.no_grad()
    def stream(self, text_embeddings: torch.Tensor, num_frames: int, *, noise=None,
               initial_latent: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
        """Yields the latent chunks [B, 16, F, H, W] (float32) of a ``num_frames``-frame video
        conditioned on ``text_embeddings`` [B, Lt, text_dim]; the last chunk may be shorter.

        ``noise``: ``None`` (draw from ``seed``), a ``torch.Generator``, or the starting noise of
        every generated frame, a ``[B, 16, num_frames, H, W]`` tensor (module docstring: the draw
        order). ``initial_latent``: clean latents ``[B, 16, F0, H, W]`` (``F0`` a multiple of
        ``chunk_frames``) written to the cache at timestep 0, chunk by chunk, before the first
        generated chunk, as Self-Forcing does for video extension; they are not yielded and
        ``num_frames`` counts only the frames generated after them."""
        checks.positive_int(num_frames, "num_frames")
        model, mc = self.model, self.model.config
        B = text_embeddings.shape[0]
        if B != self.batch:
            raise ValueError(f"text_embeddings has batch {B}, the generator was built for {self.batch}")
        C = self.config.chunk_frames
        shape = (B, mc.in_dim, num_frames, *mc.latent_hw)
        noise_frames, gen = self._noise_source(noise, shape)
        prefix = self._check_prefix(initial_latent)
        self.cache.reset()
        text_kv = model.text_kv(text_embeddings)
        for start in range(0, 0 if prefix is None else prefix.shape[2], C):
            self.cache.begin_chunk(C)
            self._pass(prefix[:, :, start:start + C], 0.0, text_kv)
            self.cache.end_chunk()
        done = 0
        while done < num_frames:
            F = min(C, num_frames - done)
            if noise_frames is None:
                x = self._draw((B, mc.in_dim, F, *mc.latent_hw), gen)
            else:
                x = noise_frames[:, :, done:done + F]
            self.cache.begin_chunk(F)
            x0 = self._denoise(x, text_kv, gen)
            self._later_pass(self._context_input(x0, gen), self.context_noise, text_kv)
            self.cache.end_chunk()
            done += F
            yield x0

    def _denoise(self, x: torch.Tensor, text_kv: list, gen: torch.Generator) -> torch.Tensor:
        """The chunk's denoising steps from noise ``x``: its clean prediction x0."""
        for i, sigma in enumerate(self.sigmas):
            run_pass = self._pass if i == 0 else self._later_pass
            flow = run_pass(x, sigma * 1000.0, text_kv)
            x0 = x - sigma * flow
            if i + 1 < len(self.sigmas):
                nxt = self.sigmas[i + 1]
                x = (1 - nxt) * x0 + nxt * self._draw(x0.shape, gen)
        return x0

    def _context_input(self, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not (self.context_renoise and self.context_noise > 0):
            return x0
        c = self.context_noise / 1000.0
        return (1 - c) * x0 + c * self._draw(x0.shape, gen)

    def _draw(self, shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=self.model.device)

    def _noise_source(self, noise, shape) -> tuple[Optional[torch.Tensor], torch.Generator]:
        """(the given starting-noise tensor or None, the generator every other draw comes from)."""
        dev = self.model.device
        if isinstance(noise, torch.Generator):
            if noise.device.type != torch.device(dev).type:
                raise ValueError(f"noise is a torch.Generator on {noise.device}, the model is on {dev}")
            return None, noise
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        if noise is None:
            return None, gen
        if not isinstance(noise, torch.Tensor):
            checks.fail_type(f"noise must be None, a torch.Generator or a tensor {list(shape)}, "
                             f"got {type(noise).__name__}")
        if tuple(noise.shape) != shape or not noise.is_floating_point():
            raise ValueError(f"noise must be a floating tensor [B, in_dim, num_frames, H, W] = "
                             f"{list(shape)}, got {noise.dtype} {list(noise.shape)}")
        return noise.to(dev, torch.float32), gen

    def _check_prefix(self, initial_latent) -> Optional[torch.Tensor]:
        if initial_latent is None:
            return None
        mc, C = self.model.config, self.config.chunk_frames
        if not isinstance(initial_latent, torch.Tensor):
            checks.fail_type(f"initial_latent must be a tensor, got {type(initial_latent).__name__}")
        s = tuple(initial_latent.shape)
        if (len(s) != 5 or s[0] != self.batch or s[1] != mc.in_dim or s[3:] != tuple(mc.latent_hw)
                or s[2] == 0 or s[2] % C or not initial_latent.is_floating_point()):
            raise ValueError(f"initial_latent must be a floating tensor [B={self.batch}, "
                             f"{mc.in_dim}, F0, {mc.latent_hw[0]}, {mc.latent_hw[1]}] with F0 a "
                             f"positive multiple of chunk_frames={C}, got {list(s)}")
        return initial_latent.to(self.model.device, torch.float32)

    def generate(self, text_embeddings: torch.Tensor, num_frames: int, *, noise=None,
                 initial_latent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole latent video [B, 16, F0 + num_frames, H, W]: the ``initial_latent`` prefix
        (if any) followed by the generated frames, as Self-Forcing's ``inference`` returns it."""
        chunks = list(self.stream(text_embeddings, num_frames, noise=noise,
                                  initial_latent=initial_latent))
        if initial_latent is not None:
            chunks.insert(0, initial_latent.to(chunks[0].device, torch.float32))
        return torch.cat(chunks, dim=2)
