"""One timed streaming run: what ``vidstream demo`` and ``bench/bench_stream.py`` both measure.

Builds a ``StreamingGenerator``, streams a short untimed warm-up (so first-call costs such as
allocation, kernel loading and cuBLAS heuristics do not count), then streams the video and
records, per chunk, the frames done, the wall milliseconds (the device synchronised) and the
cache bytes.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .generator import StreamingGenerator


@dataclass
class ChunkRecord:
    frame: int          # frames done once this chunk is out
    ms: float           # wall time of the chunk, device work included
    cache_bytes: int    # cache size after it


@dataclass
class StreamRun:
    frames: int
    seconds: float                  # the whole timed stream
    rows: list                      # one ChunkRecord per chunk
    cache_bytes: int                # at the end
    max_position: int               # largest temporal RoPE position the cache used
    peak_memory_bytes: int          # GPU allocator peak on CUDA, else the process's peak RSS
    chunks: list = field(default_factory=list)  # the latent chunks on the CPU, when kept

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stream(model, text: torch.Tensor, frames: int, *, cache: str = "bounded",
               kernels: Optional[str] = None, warmup_frames: Optional[int] = None,
               keep_chunks: bool = False,
               on_chunk: Optional[Callable[[ChunkRecord, float], None]] = None,
               **generator_options) -> StreamRun:
    """Streams ``frames`` latent frames of ``model`` conditioned on ``text`` with the ``cache``
    ("bounded" or "naive") and ``generator_options`` (``StreamingGenerator`` keywords).
    ``kernels``: a backend name to force for the whole run (``vidstream.use_backend``), None to
    leave the choice as it is. ``warmup_frames``: untimed frames first (default two chunks).
    ``on_chunk(record, elapsed_s)`` is called after each chunk (a progress bar)."""
    from .. import use_backend

    gen = StreamingGenerator(model, cache=cache, **generator_options)
    device = torch.device(model.device)
    if warmup_frames is None:
        warmup_frames = 2 * gen.config.chunk_frames
    with use_backend(kernels) if kernels is not None else contextlib.nullcontext():
        if warmup_frames:
            for _ in gen.stream(text, min(frames, warmup_frames)):
                pass
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows, chunks, done = [], [], 0
        t_start = t0 = time.perf_counter()
        for x in gen.stream(text, frames):
            _sync(device)
            ms = (time.perf_counter() - t0) * 1e3
            done += x.shape[2]
            rows.append(ChunkRecord(frame=done, ms=ms, cache_bytes=gen.cache.nbytes))
            if keep_chunks:
                chunks.append(x.cpu())
            if on_chunk is not None:
                on_chunk(rows[-1], time.perf_counter() - t_start)
            t0 = time.perf_counter()  # the copy and the callback are not the next chunk's time
        seconds = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return StreamRun(frames=done, seconds=seconds, rows=rows, cache_bytes=gen.cache.nbytes,
                     max_position=gen.cache.max_position, peak_memory_bytes=peak, chunks=chunks)


def add_partition_options(parser, *, recent_frames: int, mid_blocks: int, top_k: int) -> None:
    """The cache partition flags of a run (latent frames): the demo and the benchmark take the
    same ones with different defaults."""
    parser.add_argument("--chunk-frames", type=int, default=3,
                        help="latent frames generated per chunk")
    parser.add_argument("--sink-frames", type=int, default=3,
                        help="first frames kept for ever (a multiple of --chunk-frames)")
    parser.add_argument("--recent-frames", type=int, default=recent_frames,
                        help="previous frames kept at full resolution (a multiple of --chunk-frames)")
    parser.add_argument("--mid-blocks", type=int, default=mid_blocks,
                        help="compressed blocks of older frames kept (0: none)")
    parser.add_argument("--top-k", type=int, default=top_k,
                        help="mid blocks attended per chunk, chosen by select_blocks")


def partition_options(args) -> dict:
    """``StreamingGenerator`` keywords of the flags ``add_partition_options`` added."""
    return dict(chunk_frames=args.chunk_frames, sink_frames=args.sink_frames,
                recent_frames=args.recent_frames, mid_blocks=args.mid_blocks, top_k=args.top_k)
