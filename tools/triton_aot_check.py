"""Ahead-of-time compile of every Triton kernel of vidstream for a GPU (default sm_90), on a machine
without one: what the interpreter never sees (lowering, layouts, dot shapes, bfloat16, shared
memory, the API of another triton version) fails here rather than on the first GPU run.

    build/triton-3.6.0/bin/python tools/triton_aot_check.py   # as tools/compile_check.sh runs it
    .venv/bin/python tools/triton_aot_check.py --arch 80 --configs all --timeout 0 -j 4

Each public op runs once per dtype (float32, float16, bfloat16) and mask/feature variant on small
CPU tensors on the triton backend, with ``wrap_triton`` of the kernel modules replaced by a
recorder: the launch ``kernel[grid](*args, **kwargs)`` is captured, not run. The JIT's own binder
then specializes those arguments as a launch on a GPU would (pointer dtypes, i32/i64, ints equal
to 1 or divisible by 16, constexprs, num_warps/num_stages), and ``triton.compile`` builds
``ASTSource(kernel, signature, constexprs, attrs)`` for ``GPUTarget("cuda", arch, 32)`` (the
target the CUDA driver reports) down to cubin, with the ptxas triton bundles. Autotuned kernels:
the first and the largest config of each variant (``--configs all``: every one), more when all
those need too much shared memory, as the autotuner would; the configs are what the kernel module
gives under the current environment (``VIDSTREAM_TRITON_AUTOTUNE=first``: the first alone).

Each compile runs in a process of its own, stopped after ``--timeout`` seconds and reported
``slow`` with the stage it reached (a warning: a first GPU launch pays that compile in full).
Exit status 1 when a kernel x variant does not compile, needs more shared memory than the GPU
has (autotuned: when every config tried does; the autotuner skips such a config), or when a
``@triton.jit`` function of ``vidstream.triton_kernels`` is neither launched by the scenarios
below nor called from a launched kernel."""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # GPU autotune configs and GPU code paths (_ieee.py)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import vidstream  # noqa: E402
from vidstream import backend as vs_backend  # noqa: E402
from vidstream import triton_kernels as kernels_pkg  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Opt-in shared memory per block (bytes), what the driver checks a launch against.
MAX_SHARED = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
              120: 101376}


# ----------------------------------------------------------------------------- recording


@dataclass
class Launch:
    kernel: object  # JITFunction or Autotuner
    args: tuple
    kwargs: dict
    label: str


_launches: list = []
_label = [""]


class _Recorder:
    """Stands in for ``torch.library.wrap_triton``: ``wrap_triton(k)[grid](*a, **kw)`` records."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _launches.append(Launch(self.kernel, args, kwargs, _label[0]))
        return launch


def _kernel_modules():
    return [importlib.import_module(f"{kernels_pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(kernels_pkg.__path__)]


@contextlib.contextmanager
def recording():
    """The triton backend on CPU tensors of any kernel dtype, every launch recorded."""
    mods = [m for m in _kernel_modules() if hasattr(m, "wrap_triton")]
    saved = [m.wrap_triton for m in mods]
    usable = vs_backend.usable

    def usable_here(backend, op_name, device, dtype):
        if backend == "triton":
            return None if dtype != torch.float64 else "float64"
        return usable(backend, op_name, device, dtype)

    try:
        for m in mods:
            m.wrap_triton = _Recorder
        vs_backend.usable = usable_here
        with vidstream.use_backend("triton"):
            yield
    finally:
        vs_backend.usable = usable
        for m, w in zip(mods, saved):
            m.wrap_triton = w


# ----------------------------------------------------------------------------- scenarios
# Representative launches: the head dims and latent sizes of the model, and every constexpr
# branch the ops select (window, IEEE/16-bit, positional keys, split queries, per-head temporal
# theta, key sums, score kind). Integer arguments avoid 1 where a real run has other values:
# the JIT makes an int equal to 1 a constant, which would hide the general path.


HEAD_DIMS = [128]  # attention head dims (--head-dims)


def _attention(dt):
    g = torch.Generator().manual_seed(0)
    for D in HEAD_DIMS:
        q = torch.randn(1, 64, 4, D, generator=g).to(dt)
        k = torch.randn(1, 64, 2, D, generator=g).to(dt)
        for window in (None, 4):
            _label[0] = f"D={D} window={window}"
            vidstream.chunk_attention(q, k, k, frame_tokens=8, chunk_frames=2, sink_frames=2,
                                      window_frames=window)
        pool = torch.randn(1, 96, 2, D, generator=g).to(dt)
        _label[0] = f"D={D}"
        vidstream.cached_attention(q[:, :32], pool, pool, [(0, 16), (32, 80)])
        _label[0] = f"D={D} kv_deltas"  # issue #12: the key tiles rotated as they are loaded
        vidstream.cached_attention(q[:, :32], pool, pool, [(0, 16), (32, 80)],
                                   kv_deltas=[-2.5, 3.0], t_theta=torch.tensor([1.0e4, 2.0e4]))


def _lowrank(dt):
    g = torch.Generator().manual_seed(0)
    B, P, H, d_v = 1, 64, 2, 128
    for d_c, d_r in ((512, 64), (192, 0)):  # the largest latent tile; no positional keys
        d_nope = 128 - d_r
        c = torch.randn(B, P, d_c, generator=g).to(dt)
        w_uk = torch.randn(H, d_c, d_nope, generator=g).to(dt)
        w_uv = torch.randn(H, d_c, d_v, generator=g).to(dt)
        k_r = torch.randn(B, P, d_r, generator=g).to(dt) if d_r else None
        q = torch.randn(B, 16, H, d_nope + d_r, generator=g).to(dt)
        _label[0] = f"d_c={d_c} d_r={d_r}"
        vidstream.lowrank_decompress(c, w_uk, w_uv, [(0, 16), (32, 60)], k_r)
        vidstream.lowrank_cached_attention(q, c, w_uk, w_uv, [(0, 16), (32, 60)], k_r_pool=k_r,
                                           strategy="absorb")
        if d_r:  # issue #12: k_r rotated per token as it is loaded
            _label[0] = f"d_c={d_c} d_r={d_r} kv_deltas"
            vidstream.lowrank_cached_attention(q, c, w_uk, w_uv, [(0, 16), (32, 60)],
                                               k_r_pool=k_r, kv_deltas=[1.5, -3.0],
                                               strategy="absorb")


def _rope(dt):
    g = torch.Generator().manual_seed(0)
    H, D, grid = 2, 128, (2, 4, 6)
    L = grid[0] * grid[1] * grid[2]
    for t_theta in (None, torch.tensor([1.0e4, 2.0e4])):
        _label[0] = "t_theta=per-head" if t_theta is not None else "t_theta=None"
        x = torch.randn(1, L, H, D, generator=g).to(dt)
        vidstream.rope3d(x, grid=grid, frame_offset=3, t_theta=t_theta)
        pool = torch.randn(1, 96, H, D, generator=g).to(dt)
        vidstream.rope3d_shift_(pool, [(0, 24), (48, 80)], torch.tensor([-2.0, 3.0]),
                                t_theta=t_theta)
        v_pool = torch.randn(1, 96, H, D, generator=g).to(dt)
        vidstream.rope3d_store_(pool, v_pool, x, x.clone(), torch.tensor([48, 0]),
                                torch.tensor([5.0, 6.0]), grid=grid, t_theta=t_theta)


def _select(dt):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 4, 128, generator=g).to(dt)
    k_pool = torch.randn(1, 128, 2, 128, generator=g).to(dt)
    blocks = [(16 * i, 16 * i + 16) for i in range(8)]
    sums = vidstream.ops.select_blocks.block_key_sums(k_pool, blocks)
    for score, s in (("mean", None), ("mean", sums), ("max", None)):
        for deltas in (None, [0.5 * i - 2 for i in range(8)]):  # issue #12: block offsets
            _label[0] = f"score={score}" + (" key sums" if s is not None else "") + (
                " block_deltas" if deltas else "")
            vidstream.select_blocks(q, k_pool, blocks, 3, query_stride=4, score=score,
                                    block_key_sums=s, block_deltas=deltas,
                                    t_theta=torch.tensor([1.0e4, 2.0e4]))


def _attention_backward(dt):
    from vidstream.triton_kernels import attention_backward as ab

    g = torch.Generator().manual_seed(0)
    for D in HEAD_DIMS:
        q = torch.randn(1, 64, 4, D, generator=g).to(dt)
        k = torch.randn(1, 64, 2, D, generator=g).to(dt)
        out = torch.randn(1, 64, 4, D, generator=g).to(dt)
        lse = torch.zeros(1, 4, 64)
        for window in (None, 4):
            _label[0] = f"D={D} window={window}"
            ab.chunk_attention_backward_triton(out, q, k, k, out, lse, 8, 2, 2, window, 0.1)
        pool = torch.randn(1, 96, 2, D, generator=g).to(dt)
        ranges = torch.tensor([[0, 16], [32, 80]], dtype=torch.int32)
        deltas = torch.tensor([1.0, -2.5], dtype=torch.float64)
        for d, tt in ((None, None), (deltas, torch.tensor([1.0e4, 2.0e4]))):
            _label[0] = f"D={D} kv_deltas={d is not None}"
            ab.cached_attention_backward_triton(out[:, :32], q[:, :32], pool, pool, out[:, :32],
                                                lse[:, :, :32], ranges, 0.1, d, 10000.0, tt)


SCENARIOS = {"attention": _attention, "attention_backward": _attention_backward,
             "lowrank": _lowrank, "rope3d": _rope, "select_blocks": _select}


# ----------------------------------------------------------------------------- compile jobs


@dataclass
class Job:
    name: str
    variant: str
    jit: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str = ""  # autotune config, "" when not autotuned
    autotuned: bool = False
    reserve: bool = False  # a config compiled only when those picked all need too much memory
    seen_in: list = field(default_factory=list)


def _jit_of(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _config_size(cfg) -> tuple:
    tile = 1
    for k, v in cfg.kwargs.items():
        if k.startswith("BLOCK") and isinstance(v, int):
            tile *= v
    return tile, cfg.num_warps or 0, cfg.num_stages or 0


def _pick_configs(configs, mode: str) -> list:
    if mode == "all" or len(configs) <= 1:
        return list(configs)
    largest = max(configs, key=_config_size)
    return [configs[0]] + ([largest] if largest is not configs[0] else [])


def _config_label(cfg) -> str:
    kw = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{kw} warps={cfg.num_warps} stages={cfg.num_stages}"


def _variant(dtype: str, jit: JITFunction, constexprs: dict, label: str) -> str:
    flags = [f"{jit.arg_names[k[0]]}={v}" for k, v in constexprs.items()
             if isinstance(v, (bool, str)) and len(k) == 1]
    return " ".join([dtype] + flags + ([label] if label else []))


def build_jobs(target: GPUTarget, configs: str, only: list, skip=()) -> tuple:
    backend = make_backend(target)
    jobs: dict = {}
    launched = set()
    t0 = time.perf_counter()
    for scen, fn in SCENARIOS.items():
        if only and scen not in only:
            continue
        for dname, dt in DTYPES.items():
            if f"{scen}:{dname}" in skip:
                continue
            _launches.clear()
            with recording():
                fn(dt)
            for rec in _launches:
                jit = _jit_of(rec.kernel)
                launched.add(jit)
                binder = create_function_from_signature(jit.signature, jit.params, backend)
                tuned = isinstance(rec.kernel, Autotuner)
                picked = _pick_configs(rec.kernel.configs, configs) if tuned else [None]
                rest = [c for c in rec.kernel.configs if c not in picked] if tuned else []
                for cfg in picked + rest:
                    kw = dict(rec.kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
                    bound, spec, opts = binder(*rec.args, **kw)
                    options, sig, consts, attrs = jit._pack_args(backend, kw, bound, spec, opts)
                    key = repr((jit.fn.__module__, jit.fn.__name__, sorted(sig.items()),
                                sorted(consts.items()), sorted(attrs.items()),
                                sorted(options.__dict__.items())))
                    name = f"{jit.fn.__module__.rsplit('.', 1)[-1]}.{jit.fn.__name__}"
                    if key not in jobs:
                        jobs[key] = Job(name, _variant(dname, jit, consts, rec.label), jit, sig,
                                        consts, attrs, dict(options.__dict__),
                                        _config_label(cfg) if cfg is not None else "", tuned,
                                        cfg in rest)
                    if f"{scen}/{dname}" not in jobs[key].seen_in:
                        jobs[key].seen_in.append(f"{scen}/{dname}")
    return list(jobs.values()), launched, time.perf_counter() - t0


def uncovered(launched: set) -> list:
    """@triton.jit functions of the kernel modules neither launched nor called (transitively)
    from a launched kernel: a new kernel without a scenario above."""
    everything = {}
    for m in _kernel_modules():
        for name, obj in vars(m).items():
            if isinstance(obj, (JITFunction, Autotuner)) and _jit_of(obj).fn.__module__ == m.__name__:
                everything[name] = _jit_of(obj)
    reached, todo = set(), [j for j in everything.values() if j in launched]
    while todo:
        jit = todo.pop()
        if jit in reached:
            continue
        reached.add(jit)
        for ident in set(re.findall(r"\b\w+\b", inspect.getsource(jit.fn))):
            if ident in everything and ident != jit.fn.__name__:
                todo.append(everything[ident])
    return sorted(f"{j.fn.__module__}.{n}" for n, j in everything.items() if j not in reached)


# ----------------------------------------------------------------------------- compiling

_JOBS: list = []
_TARGET: list = []


def _track_stages(conn) -> None:
    """In a compile process: report each compiler stage (ttir, ttgir, llir, ptx, cubin) as it
    starts, so a compile stopped at the time limit says how far it got."""
    import triton.compiler.compiler as cc

    make = cc.make_backend

    def make_backend(target):
        be = make(target)
        add = be.add_stages

        def add_stages(stages, options, *rest):
            add(stages, options, *rest)
            for name, fn in list(stages.items()):
                def staged(src, metadata, _name=name, _fn=fn):
                    conn.send(("stage", _name))
                    return _fn(src, metadata)
                stages[name] = staged

        be.add_stages = add_stages
        return be

    cc.make_backend = make_backend


def _compile(i: int) -> dict:
    job = _JOBS[i]
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(job.jit, job.signature, job.constexprs, job.attrs),
                           target=_TARGET[0], options=job.options)
        ptx = k.asm.get("ptx", "")
        if "cubin" not in k.asm:
            return dict(error="no cubin produced", time=time.perf_counter() - t0)
        mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else ""
        return dict(shared=k.metadata.shared, mma=mma, time=time.perf_counter() - t0)
    except Exception as e:  # every failure is reported, then the run fails
        return dict(error=f"{type(e).__name__}: {e}", time=time.perf_counter() - t0)


def _child(i: int, conn) -> None:
    try:
        _track_stages(conn)
    except Exception:  # stage names are a nicety; compile without them
        pass
    conn.send(("done", _compile(i)))
    conn.close()


def run_jobs(order: list, n_procs: int, timeout: float, on_done) -> None:
    """Compiles the jobs ``order`` (indices; ``on_done(i, result)`` may return more to run) in
    up to ``n_procs`` forked processes, each stopped after ``timeout`` s (0: no limit)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("fork")
    pending, running = list(order), {}
    while pending or running:
        while pending and len(running) < max(n_procs, 1):
            i = pending.pop(0)
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(i, w), daemon=True)
            p.start()
            w.close()
            running[i] = [p, r, time.perf_counter(), "start", None]
        wait([v[1] for v in running.values()] + [v[0].sentinel for v in running.values()],
             timeout=1.0)
        for i, st in list(running.items()):
            p, r, t0 = st[0], st[1], st[2]
            try:
                while r.poll():
                    kind, val = r.recv()
                    if kind == "stage":
                        st[3] = val
                    else:
                        st[4] = val
            except (EOFError, OSError):
                pass
            res = st[4]
            if res is None and not p.is_alive():
                res = dict(error=f"compiler process died (exit code {p.exitcode}) in {st[3]}",
                           time=time.perf_counter() - t0)
            elif res is None and timeout and time.perf_counter() - t0 > timeout:
                p.kill()
                res = dict(timeout=True, stage=st[3], time=time.perf_counter() - t0)
            if res is None:
                continue
            p.join()
            r.close()
            del running[i]
            pending[:0] = on_done(i, res) or []


def _expected_cost(job: Job) -> tuple:
    # Long compiles first: autotuned (attention) kernels, larger tiles, float32 (FMA dots).
    tile = 1
    for k, v in job.constexprs.items():
        if job.jit.arg_names[k[0]].startswith("BLOCK") and isinstance(v, int):
            tile *= v
    return (not job.autotuned, "fp32" not in job.variant, -tile)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90: sm_90)")
    ap.add_argument("--configs", choices=("first-largest", "all"), default="first-largest",
                    help="autotune configs compiled per kernel x variant (more are tried when "
                         "every one tried needs too much shared memory)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                    help="compile processes")
    ap.add_argument("--timeout", type=float, default=90.0,
                    help="seconds per compile before it is stopped and reported slow (0: none)")
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=[],
                    help="only these op families")
    ap.add_argument("--skip", nargs="*", default=[], metavar="FAMILY:DTYPE",
                    help="family x dtype pairs not compiled, e.g. attention_backward:fp32 (its "
                         "IEEE float32 kernels take minutes each on 2 cores)")
    ap.add_argument("--head-dims", default="128",
                    help="comma-separated attention head dims (default 128, the model's)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each signature")
    a = ap.parse_args(argv)

    HEAD_DIMS[:] = [int(d) for d in a.head_dims.split(",")]
    t_start = time.perf_counter()
    target = GPUTarget("cuda", a.arch, 32)  # what the CUDA driver reports: warp size 32
    bad = [s for s in a.skip if s.partition(":")[0] not in SCENARIOS or s.partition(":")[2] not in DTYPES]
    if bad:
        ap.error(f"--skip takes FAMILY:DTYPE with a family of {sorted(SCENARIOS)} and a dtype of "
                 f"{sorted(DTYPES)}, got {bad}")
    jobs, launched, t_rec = build_jobs(target, a.configs, a.only, set(a.skip))
    missing = [] if a.only else uncovered(launched)
    _JOBS[:] = jobs
    _TARGET[:] = [target]
    first = [i for i, j in enumerate(jobs) if not j.reserve]
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), torch "
          f"{torch.__version__}; target sm_{a.arch}; {len(first)} compiles recorded in "
          f"{t_rec:.1f} s; {a.jobs} process(es), {a.timeout:g} s limit each", flush=True)

    limit = MAX_SHARED.get(a.arch)
    results: dict = {}
    width = max(len(j.name) for j in jobs) if jobs else 0

    def status(i: int) -> str:
        res, job = results[i], jobs[i]
        if res.get("timeout"):
            return "slow"
        if "error" in res:
            return "FAIL"
        if limit is not None and res["shared"] > limit:
            return "over" if job.autotuned else "FAIL"
        return "ok"

    def variant_jobs(job: Job) -> list:
        return [k for k, j in enumerate(jobs) if (j.name, j.variant) == (job.name, job.variant)]

    def on_done(i: int, res: dict) -> list:
        results[i] = res
        job, st = jobs[i], status(i)
        if "error" in res or res.get("timeout"):
            detail = f"{res['time']:5.1f} s" + (f", stopped in {res['stage']}" if res.get("timeout")
                                                 else "")
        else:
            detail = f"{res['time']:5.1f} s  smem {res['shared']} B" + (
                f"  {res['mma']}" if res["mma"] else "")
        cfg = f"  [{job.config}]" if job.config else ""
        print(f"{st:4}  {job.name:<{width}}  {job.variant}{cfg}  {detail}", flush=True)
        if st == "over" or (st == "FAIL" and "error" not in res):
            print(f"      needs {res['shared']} B shared memory, sm_{a.arch} has {limit}"
                  + ("; the autotuner skips this config" if job.autotuned else ""))
        if a.verbose or "error" in res:
            print(f"      signature {job.signature}")
            print(f"      constexprs {job.constexprs}  num_warps={job.options['num_warps']} "
                  f"num_stages={job.options['num_stages']}  launched by {', '.join(job.seen_in)}")
        if "error" in res:
            lines = res["error"].rstrip().splitlines()
            for line in lines[:60] + (["..."] if len(lines) > 60 else []):
                print(f"      | {line}")
        sys.stdout.flush()
        # Every config tried so far needs too much shared memory: try the next (the autotuner
        # would fall back on it), unless one is still compiling or was stopped.
        if st == "over":
            scheduled = [k for k in variant_jobs(job) if not jobs[k].reserve]
            if all(k in results and status(k) == "over" for k in scheduled):
                nxt = [k for k in variant_jobs(job) if jobs[k].reserve]
                if nxt:
                    jobs[nxt[0]].reserve = False
                    return nxt[:1]
        return []

    t0 = time.perf_counter()
    run_jobs(sorted(first, key=lambda i: _expected_cost(jobs[i])), a.jobs, a.timeout, on_done)
    t_compile = time.perf_counter() - t0

    failed = sum(status(i) == "FAIL" for i in results)
    slow = [i for i in results if status(i) == "slow"]
    for key in dict.fromkeys((j.name, j.variant) for j in jobs if j.autotuned):
        tried = [i for i in results if (jobs[i].name, jobs[i].variant) == key]
        states = {status(i) for i in tried}
        if "ok" not in states and "FAIL" not in states and "slow" not in states:
            failed += 1
            print(f"FAIL  {key[0]}  {key[1]}: no autotune config fits in {limit} B shared memory")
        elif states <= {"over", "slow"} and "slow" in states:
            print(f"slow  {key[0]}  {key[1]}: no autotune config tried compiled within "
                  f"{a.timeout:g} s (shared memory not known)")
    for m in missing:
        failed += 1
        print(f"FAIL  {m}: @triton.jit function never compiled (add a launch to the scenarios of "
              f"tools/triton_aot_check.py)")
    if slow:
        print(f"note: {len(slow)} compile(s) stopped after {a.timeout:g} s (stage shown above); a "
              f"first GPU launch pays each in full; --timeout 0 compiles them to the end")
    kernels = len({jobs[i].name for i in results})
    variants = len({(jobs[i].name, jobs[i].variant) for i in results})
    print(f"triton_aot_check: triton {triton.__version__} sm_{a.arch}: {kernels} kernels, "
          f"{variants} kernel x variants, {len(results)} compiles ({a.configs} autotune configs): "
          f"{sum(status(i) in ('ok', 'over') for i in results)} compiled, {len(slow)} stopped "
          f"(slow), {failed} failed; compile {t_compile:.0f} s, total "
          f"{time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
