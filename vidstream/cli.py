"""``vidstream demo``: stream a video with the bounded cache, optionally the eager baseline too
(the naive cache on the reference kernels), and report speed, memory and the difference between
them (table, DIR/demo.json, DIR/demo.png)."""

from __future__ import annotations

import argparse
import sys

import torch

from . import demo_report
from .streaming.generator import LEGACY_BACKENDS
from .streaming.model import PRESETS, StreamingDiT
from .streaming.runner import add_partition_options, partition_options, run_stream

# demo.json's "backend" and the table keep the names the generator's cache choice had.
RUN_LABELS = {cache: legacy for legacy, cache in LEGACY_BACKENDS.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(args):
    """The seeded model and text embeddings of the run."""
    torch.manual_seed(args.seed)
    if args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {sorted(PRESETS)}")
    dtype = DTYPES[args.dtype]
    model = StreamingDiT(args.preset, seed=args.seed, dtype=dtype, device=args.device).eval()
    cfg = model.config
    gtext = torch.Generator().manual_seed(args.seed + 1)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gtext).to(args.device, dtype)
    return model, text


def run(model, text, args, label, *, cache, kernels=None, keep_chunks=False):
    """One timed stream of ``args.frames`` frames under a progress bar."""
    with demo_report.progress(label, args.frames) as on_chunk:
        return run_stream(model, text, args.frames, cache=cache, kernels=kernels,
                          keep_chunks=keep_chunks, on_chunk=on_chunk, seed=args.seed,
                          timesteps=tuple(args.timesteps), **partition_options(args))


def demo(args) -> dict:
    model, text = build(args)
    print(demo_report.header(args, model))
    label = RUN_LABELS[args.cache]
    fused = run(model, text, args, label, cache=args.cache, keep_chunks=args.compare)
    eager = run(model, text, args, "eager reference", cache="naive", kernels="reference",
                keep_chunks=True) if args.compare else None
    result = demo_report.summary(args, label, fused, eager)
    demo_report.print_table(result)
    demo_report.write(args.out, result, fused, eager)
    return result


def _cache_choice(args) -> str:
    """``--cache``, or what the deprecated ``--backend`` maps to."""
    if args.backend is None:
        return args.cache or "bounded"
    mapped = LEGACY_BACKENDS[args.backend]
    print(f"vidstream demo: --backend {args.backend} is deprecated, use --cache {mapped} "
          "(kernels are chosen with VIDSTREAM_BACKEND)", file=sys.stderr)
    if args.cache not in (None, mapped):
        raise SystemExit(f"--backend {args.backend} means --cache {mapped}, which contradicts "
                         f"--cache {args.cache}")
    return mapped


def _parser():
    p = argparse.ArgumentParser(prog="vidstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="stream a video and compare the bounded cache with the eager baseline")
    d.add_argument("--preset", default="tiny", help="tiny | wan-1.3b")
    d.add_argument("--frames", type=int, default=2000, help="latent frames to generate")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    d.add_argument("--cache", default=None, choices=sorted(RUN_LABELS),
                   help="bounded (default): the fixed pool; naive: the growing baseline cache")
    d.add_argument("--backend", default=None, choices=sorted(LEGACY_BACKENDS),
                   help="deprecated: fused is --cache bounded, reference is --cache naive")
    d.add_argument("--compare", action="store_true", help="also run the eager baseline and diff")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0,
                   help="CPU threads; 0: one for the tiny preset (its ops are too small to split), "
                        "else torch's default")
    add_partition_options(d, recent_frames=6, mid_blocks=8, top_k=4)
    d.add_argument("--timesteps", type=int, nargs="+", default=[1000, 750, 500, 250])
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "demo":
        args.cache = _cache_choice(args)
        if args.dtype is None:
            args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
        if args.frames < 1:
            raise SystemExit("--frames must be >= 1")
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        elif args.preset == "tiny" and torch.device(args.device).type == "cpu":
            torch.set_num_threads(1)
        demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
