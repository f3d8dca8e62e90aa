"""The ``vidstream`` command.

``vidstream demo`` streams a video with the bounded cache, optionally the baselines too (the
rolling buffer Self-Forcing and LongLive run, and the eager growing cache on the reference kernels),
and reports speed, memory and the difference between them (table, DIR/demo.json, DIR/demo.png).
``vidstream backends`` shows the backend each op gets by default here, ``vidstream info`` the
installation, ``vidstream --version`` the version.

Bad arguments are usage errors, found before any work (the library's own checks run on them
first): one line on stderr and exit status 2. Ctrl-C stops a demo with exit status 130 after
writing what was done so far."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import tempfile
import types

import torch

from . import demo_report
from .ops import checks
from .streaming.generator import LEGACY_BACKENDS, StreamingGenerator
from .streaming.model import PRESETS, StreamingDiT
from .streaming.rolling_cache import RopeTableExhausted
from .streaming.runner import add_partition_options, partition_options, run_stream

# demo.json's "backend" and the table keep the names the generator's cache choice had.
RUN_LABELS = {cache: legacy for legacy, cache in LEGACY_BACKENDS.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKEND_DTYPES = {**DTYPES, "float64": torch.float64}  # `vidstream backends`: float64 too
EXIT_USAGE = 2          # argparse's status for a usage error
EXIT_INTERRUPTED = 130  # 128 + SIGINT: the shell's status for a Ctrl-C
# Library keywords a demo flag feeds: their names in the library's messages become the flags.
DEMO_DESCRIPTION = ("Streams a video with the bounded cache (and with --compare the baselines: "
                    "Self-Forcing / LongLive's rolling buffer, which stops where its 1,024-frame "
                    "RoPE table ends, and the naive growing cache on the reference kernels) and "
                    "reports speed, memory and their difference: a table, DIR/demo.json and "
                    "DIR/demo.png. Ctrl-C stops it (status 130) and writes what was done.")
_KEYWORD_FLAGS = ("chunk_frames", "sink_frames", "recent_frames", "mid_blocks", "top_k",
                  "timesteps", "seed")


class UsageError(ValueError):
    """A bad argument found after parsing: reported like argparse's own errors (status 2)."""


class CommandError(Exception):
    """A command that stops with a one-line message and ``status``."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (argparse prints the whole usage before them)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each default, except where an option has none (None, or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def version() -> str:
    """vidstream's version: ``vidstream.__version__``, else the installed distribution's."""
    import vidstream

    found = getattr(vidstream, "__version__", None)
    if found:
        return found
    from importlib.metadata import version as dist_version

    return dist_version("vidstream")


# ----------------------------------------------------------------------------- argument checks


def check_device(spec: str, *, available: bool = True) -> torch.device:
    """``--device``: a CPU or CUDA device torch can name and, with ``available``, use here."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {spec!r}")
    if available and dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise UsageError(f"--device {spec}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def check_out(path: str):
    """``--out``: a folder that exists or can be made, and takes a file."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write there ({e.strerror or e})") from None


def _flags(message: str) -> str:
    """A library message about ``chunk_frames`` and the like, in terms of ``--chunk-frames``."""
    names = "|".join(_KEYWORD_FLAGS)
    return re.sub(rf"\b({names})\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def _generator_options(args, cache: str) -> dict:
    """The ``StreamingGenerator`` keywords of a demo run: one place, for the check and the run.
    The rolling buffer has the same sink and window, and no mid blocks (it has none)."""
    options = dict(cache=cache, seed=args.seed, timesteps=tuple(args.timesteps),
                   compile=args.compile and cache == "bounded", **partition_options(args))
    if cache == "rolling":
        options.update(mid_blocks=0, top_k=None)
    return options


def _compared_caches(args) -> list[str]:
    """The caches a demo runs: ``--cache``, and with ``--compare`` the two baselines."""
    return [args.cache] + ([c for c in ("rolling", "naive") if c != args.cache]
                           if args.compare else [])


def _model_outline(args):
    """What ``StreamingGenerator``'s constructor reads of a model (config, dtype, device), on the
    meta device: its checks run and its cache is laid out without building the model or
    allocating a byte."""
    return types.SimpleNamespace(config=PRESETS[args.preset], dtype=DTYPES[args.dtype],
                                 device=torch.device("meta"))


def check_demo(args):
    """Every argument of ``vidstream demo``, before any work: the library's own checks (the
    generator's and its cache's, built on the meta device) with their ValueError / TypeError
    turned into a ``UsageError``; then that ``--out`` takes files."""
    check_device(args.device)
    try:
        checks.positive_int(args.frames, "--frames")
        checks.positive_int(args.threads, "--threads", minimum=0)
        for cache in _compared_caches(args):
            StreamingGenerator(_model_outline(args), **_generator_options(args, cache))
    except (ValueError, TypeError) as e:
        raise UsageError(_flags(str(e))) from None
    check_out(args.out)


def _cache_choice(args) -> str:
    """``--cache``, or what the deprecated ``--backend`` maps to."""
    if args.backend is None:
        return args.cache or "bounded"
    mapped = LEGACY_BACKENDS[args.backend]
    if args.cache not in (None, mapped):
        raise UsageError(f"--backend {args.backend} (deprecated) means --cache {mapped}, which "
                         f"contradicts --cache {args.cache}")
    print(f"vidstream demo: --backend {args.backend} is deprecated, use --cache {mapped} "
          "(kernels are chosen with VIDSTREAM_BACKEND)", file=sys.stderr)
    return mapped


# ----------------------------------------------------------------------------- demo


def build(args) -> tuple[StreamingDiT, torch.Tensor]:
    """The seeded model and text embeddings of the run."""
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    model = StreamingDiT(args.preset, seed=args.seed, dtype=dtype, device=args.device).eval()
    cfg = model.config
    gtext = torch.Generator().manual_seed(args.seed + 1)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gtext).to(args.device, dtype)
    return model, text


def run(model, text, args, label, *, cache, kernels=None, keep_chunks=False):
    """One timed stream of ``args.frames`` frames under a progress display. On Ctrl-C the
    ``KeyboardInterrupt`` carries the chunks done so far as ``partial`` (a ``StreamRun``)."""
    done = []
    with demo_report.progress(label, args.frames, done) as on_chunk:
        try:
            return run_stream(model, text, args.frames, kernels=kernels, keep_chunks=keep_chunks,
                              on_chunk=on_chunk, **_generator_options(args, cache))
        except KeyboardInterrupt as e:
            e.partial = demo_report.partial_run(done, model.device)
            raise


def run_rolling(model, text, args):
    """The rolling-buffer baseline: ``(StreamRun, None)``, or where its RoPE table ran out the
    chunks it made and why it stopped (the comparison goes on; Self-Forcing would crash there)."""
    done = []
    with demo_report.progress("rolling buffer", args.frames, done) as on_chunk:
        try:
            return run_stream(model, text, args.frames, on_chunk=on_chunk,
                              **_generator_options(args, "rolling")), None
        except KeyboardInterrupt as e:
            e.partial = demo_report.partial_run(done, model.device)
            raise
        except RopeTableExhausted as e:
            return demo_report.partial_run(done, model.device), str(e)


def demo(args) -> dict:
    """Runs the demo and returns its result; on Ctrl-C writes the partial result and raises a
    ``CommandError`` with status 130."""
    model, text = build(args)
    print(demo_report.header(args, model), flush=True)
    label = RUN_LABELS[args.cache]
    fused = rolling = eager = stopped = None
    try:
        fused = run(model, text, args, label, cache=args.cache, keep_chunks=args.compare)
        if args.compare:
            rolling, stopped = run_rolling(model, text, args)
            eager = run(model, text, args, "eager reference", cache="naive", kernels="reference",
                        keep_chunks=True)
    except KeyboardInterrupt as e:
        partial = getattr(e, "partial", None)
        if partial is None:  # between the runs
            partial = demo_report.partial_run([], model.device)
        if fused is None:
            fused, which = partial, f"frame {partial.frames}"
        elif rolling is None:
            rolling, which = partial, f"the rolling-buffer run's frame {partial.frames}"
        else:
            eager, which = partial, f"the eager run's frame {partial.frames}"
        result = demo_report.summary(args, label, fused, eager, interrupted=True, rolling=rolling,
                                     rolling_stopped=stopped)
        paths = demo_report.write(args.out, result, fused, eager, rolling=rolling, quiet=True)
        raise CommandError(f"interrupted at {which} of {args.frames}; partial results in "
                           f"{' and '.join(paths)}", EXIT_INTERRUPTED) from None
    result = demo_report.summary(args, label, fused, eager, rolling=rolling,
                                 rolling_stopped=stopped)
    demo_report.print_table(result)
    demo_report.write(args.out, result, fused, eager, rolling=rolling)
    return result


def _demo_main(args):
    args.cache = _cache_choice(args)
    if args.dtype is None:
        args.dtype = "bfloat16" if check_device(args.device).type == "cuda" else "float32"
    check_demo(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif args.preset == "tiny" and torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)
    demo(args)


# ----------------------------------------------------------------------------- other commands


def backends_table(args) -> None:
    """``vidstream backends``: one line per op, its default backend and the reason."""
    from .backend import default_backends

    check_device(args.device, available=False)
    defaults = default_backends(args.device, BACKEND_DTYPES[args.dtype])
    width = max(map(len, defaults))
    print(f"default backends for {args.dtype} {args.device} tensors here:")
    for op_name, choice in defaults.items():
        print(f"  {op_name:<{width}}  {choice.backend:<9}  {choice.why}")


def info(args) -> None:
    """``vidstream info``: the installation (``vidstream.info.info_text()``)."""
    try:  # imported on use only: it probes the whole installation
        info_module = importlib.import_module(f"{__package__}.info")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.info":
            raise
        raise CommandError("this installation has no vidstream.info module") from None
    print(info_module.info_text())


# ----------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    fmt = {"formatter_class": _HelpFormatter}
    p = _Parser(prog="vidstream", description="Kernels and a bounded KV cache for streaming video "
                "diffusion transformers: a demo, the default backends and the installation.", **fmt)
    p.add_argument("--version", action="version", version=f"vidstream {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="stream a video and compare the bounded cache with the eager "
                                    "baseline", description=DEMO_DESCRIPTION, **fmt)
    d.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="model size (random weights)")
    d.add_argument("--frames", type=int, default=2000, help="latent frames to generate")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    d.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    d.add_argument("--cache", default=None, choices=sorted(RUN_LABELS),
                   help="bounded (default): the fixed pool; naive: the growing baseline cache")
    d.add_argument("--backend", default=None, choices=sorted(LEGACY_BACKENDS),
                   help="deprecated: fused is --cache bounded, reference is --cache naive")
    d.add_argument("--compare", action="store_true",
                   help="also run the baselines (Self-Forcing / LongLive's rolling buffer, the "
                        "eager growing cache) and diff against the eager one")
    d.add_argument("--out", default="out/demo", help="folder for demo.json and demo.png")
    d.add_argument("--seed", type=int, default=0, help="seed of the weights, text and noise")
    d.add_argument("--threads", type=int, default=0,
                   help="CPU threads; 0: one for the tiny preset (its ops are too small to split), "
                        "else torch's default")
    add_partition_options(d, recent_frames=6, mid_blocks=8, top_k=4)
    d.add_argument("--timesteps", type=int, nargs="+", default=[1000, 750, 500, 250],
                   help="denoising steps per chunk, each in (0, 1000]")
    d.add_argument("--compile", action="store_true",
                   help="run every pass after a chunk's first through torch.compile (bounded cache)")
    d.set_defaults(handler=_demo_main, subparser=d)
    b = sub.add_parser("backends", help="which backend each op gets by default here, and why",
                       **fmt)
    b.add_argument("--device", default="cuda", help="cuda (answered without a GPU too) | cpu")
    b.add_argument("--dtype", default="float16", choices=sorted(BACKEND_DTYPES))
    b.set_defaults(handler=backends_table, subparser=b)
    i = sub.add_parser("info", help="versions, build, the extension's state and the default "
                                    "backends (for bug reports)", **fmt)
    i.set_defaults(handler=info, subparser=i)
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``vidstream`` command; returns its exit status."""
    args = _parser().parse_args(argv)
    try:
        args.handler(args)
    except UsageError as e:
        args.subparser.error(str(e))
    except CommandError as e:
        print(f"{args.subparser.prog}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{args.subparser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
