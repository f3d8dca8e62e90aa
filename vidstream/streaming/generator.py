"""``StreamingGenerator``: Self-Forcing's chunk-by-chunk generation loop (docs/spec.md §6).

Per chunk of ``chunk_frames`` latent frames: a few flow-matching denoising steps (timesteps 1000,
750, 500, 250 warped with shift 5.0; the model predicts the flow ``noise - x0``, so
``x0 = x_t - sigma * flow``), re-noising the prediction to the next step's noise level in
between; then one pass at t = 0 over the clean chunk that leaves its keys and values in the
cache. Each finished chunk is yielded as soon as it is done.

``cache="bounded"`` keeps the ``StreamingKVCache`` (fixed pool, vidstream ops);
``cache="naive"`` the ``NaiveKVCache`` (growing history, clone / re-rotate / concatenate each
pass, eager reference ops): the baseline to validate and time against. The same seed draws the
same noise with both. Which kernels the vidstream ops run is not the generator's business: that
is ``vidstream.use_backend`` / ``VIDSTREAM_BACKEND``, which the generator leaves as it finds it.
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

CACHES = {"bounded": StreamingKVCache, "naive": NaiveKVCache}
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
                 compile: bool = False, compile_options: Optional[dict] = None):
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
        self.model = model
        self.seed = seed
        self.batch = batch
        self.sigmas = [t / 1000.0 for t in warp_timesteps(timesteps, shift)]
        self.config = CacheConfig(chunk_frames=chunk_frames, sink_frames=sink_frames,
                                  recent_frames=recent_frames, mid_blocks=mid_blocks, top_k=top_k,
                                  mid_evict=mid_evict, select_stride=select_stride,
                                  max_frames_rope=max_frames_rope)
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
    def stream(self, text_embeddings: torch.Tensor, num_frames: int) -> Iterator[torch.Tensor]:
        """Yields the latent chunks [B, 16, F, H, W] (float32) of a ``num_frames``-frame video
        conditioned on ``text_embeddings`` [B, Lt, text_dim]; the last chunk may be shorter."""
        checks.positive_int(num_frames, "num_frames")
        model, mc = self.model, self.model.config
        dev = model.device
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        self.cache.reset()
        B = text_embeddings.shape[0]
        if B != self.batch:
            raise ValueError(f"text_embeddings has batch {B}, the generator was built for {self.batch}")
        text_kv = model.text_kv(text_embeddings)
        C = self.config.chunk_frames
        H, W = mc.latent_hw
        done = 0
        while done < num_frames:
            F = min(C, num_frames - done)
            shape = (B, mc.in_dim, F, H, W)
            x = torch.randn(shape, generator=gen, device=dev)
            self.cache.begin_chunk(F)
            for i, sigma in enumerate(self.sigmas):
                run_pass = self._pass if i == 0 else self._later_pass
                flow = run_pass(x, sigma * 1000.0, text_kv)
                x0 = x - sigma * flow
                if i + 1 < len(self.sigmas):
                    nxt = self.sigmas[i + 1]
                    x = (1 - nxt) * x0 + nxt * torch.randn(shape, generator=gen, device=dev)
            self._later_pass(x0, 0.0, text_kv)
            self.cache.end_chunk()
            done += F
            yield x0

    def generate(self, text_embeddings: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The whole latent video [B, 16, num_frames, H, W]."""
        return torch.cat(list(self.stream(text_embeddings, num_frames)), dim=2)
