"""Which backend runs: defaults, overrides, and the errors for a backend that can't run."""

import asyncio
import contextlib
import os
import subprocess
import sys
import threading

import pytest
import torch

import vidstream
from vidstream import backend, testing


def test_backends_lists_what_runs_here():
    names = vidstream.backends()
    assert names[0] == "reference"
    assert ("cpu" in names) == vidstream._extension.load()
    assert ("cuda" in names) == (torch.cuda.is_available() and vidstream._extension.has_kernel(
        "rope3d", "CUDA"))


def test_default_on_cpu_is_the_cpp_kernel():
    pytest.importorskip("vidstream._C")
    x = torch.randn(1, 4, 2, 64)
    assert vidstream.backend_for("rope3d", x) == "cpu"
    # float64 has no kernel: the reference serves it.
    assert vidstream.backend_for("rope3d", x.double()) == "reference"
    assert vidstream.backend_for("select_blocks", x) == "cpu"


def test_use_backend_overrides_and_nests():
    x = torch.randn(1, 4, 2, 64)
    with vidstream.use_backend("reference"):
        assert vidstream.backend_for("rope3d", x) == "reference"
        if "cpu" in vidstream.backends():
            with vidstream.use_backend("cpu"):
                assert vidstream.backend_for("rope3d", x) == "cpu"
        assert vidstream.backend_for("rope3d", x) == "reference"


def test_backend_that_cannot_run_names_the_available_ones():
    x = torch.randn(1, 4, 2, 64)
    with vidstream.use_backend("cuda"):
        with pytest.raises(ValueError, match="backend 'cuda' cannot run vidstream.rope3d on torch.float32 "
                                             "cpu tensors.*Available for these inputs: reference"):
            vidstream.rope3d(x, grid=(1, 2, 2))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*reference, cpu, triton, cuda"):
        with vidstream.use_backend("fast"):
            pass


def test_cuda_tensors_default_to_gpu_validated_backends_only(monkeypatch):
    """A CUDA tensor never defaults to a kernel that vidstream/validated.json does not validate
    for this GPU: it gets the torch backend (PyTorch's own fused ops), never the eager reference."""
    monkeypatch.setattr(backend, "usable", lambda name, op, device, dtype: None)

    class Cuda:
        device, dtype = torch.device("cuda"), torch.float32

    for op in testing.ops():
        picked = vidstream.backend_for(op, Cuda)
        validated = [n for n in ("cuda", "triton") if n in testing.registered_backends(op)
                     and testing.gpu_validated(op, n, Cuda.dtype)]
        fallback = "torch" if "torch" in testing.registered_backends(op) else "reference"
        assert picked == (validated[0] if validated else fallback), op


@pytest.mark.parametrize("head_dim,dtype,want", [(128, torch.float16, "cuda"),
                                                 (96, torch.float16, "torch"),
                                                 (64, torch.float32, "torch")])
def test_gpu_default_skips_a_validated_kernel_that_does_not_serve_the_input(
        monkeypatch, head_dim, dtype, want):
    """A validated cuda attention kernel is the default only for inputs it serves (float16 /
    bfloat16, head dim 64 or 128); other inputs fall to the torch backend, not to an error."""
    monkeypatch.setattr(backend, "usable", lambda name, op, device, dtype: None)
    monkeypatch.setattr(backend, "validated", lambda op, name, dtype, arch: name == "cuda")
    q = torch.randn(1, 4, 2, head_dim).to(dtype)
    for op in ("chunk_attention", "cached_attention"):
        assert backend.op(op).gpu_default(dtype, "sm_90", torch.device("cuda"), q) == want, op


def test_forced_kernel_that_does_not_serve_the_input_says_why(monkeypatch):
    monkeypatch.setattr(backend, "usable", lambda name, op, device, dtype: None)
    q = torch.randn(1, 4, 2, 96, dtype=torch.float16)
    k = torch.randn(1, 4, 1, 96, dtype=torch.float16)
    with vidstream.use_backend("cuda"), pytest.raises(ValueError, match="head dims 64 and 128"):
        vidstream.chunk_attention(q, k, k, frame_tokens=2, chunk_frames=1)

def test_use_backend_is_local_to_a_thread():
    """Two threads forcing different backends never see each other's choice."""
    x = torch.randn(1, 4, 2, 64)
    names = [n for n in ("reference", "cpu") if n in vidstream.backends()]
    barrier = threading.Barrier(len(names))
    seen = {n: set() for n in names}

    def work(name):
        with vidstream.use_backend(name):
            barrier.wait()
            for _ in range(200):
                seen[name].add(vidstream.backend_for("rope3d", x))

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {n: {n} for n in names}
    assert vidstream.backend_for("rope3d", x) == backend.op("rope3d").default_name(x)


def test_use_backend_is_local_to_an_asyncio_task():
    x = torch.randn(1, 4, 2, 64)

    async def forced(name, seen):
        with vidstream.use_backend(name):
            await asyncio.sleep(0)
            seen.append(vidstream.backend_for("rope3d", x))
            await asyncio.sleep(0)
            seen.append(vidstream.backend_for("rope3d", x))

    async def both():
        a, b = [], []
        await asyncio.gather(forced("reference", a), forced("cpu", b))
        return a, b

    if "cpu" not in vidstream.backends():
        pytest.skip("needs the cpu backend")
    a, b = asyncio.run(both())
    assert a == ["reference"] * 2 and b == ["cpu"] * 2


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_env_override():
    r = _run("import torch, vidstream; print(vidstream.backend_for('rope3d', torch.randn(1, 4, 2, 64)))",
             VIDSTREAM_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"


def test_env_override_rejects_unknown_name():
    r = _run("import vidstream", VIDSTREAM_BACKEND="magic")
    assert r.returncode != 0 and "VIDSTREAM_BACKEND: unknown backend 'magic'" in r.stderr


def test_import_without_extension_warns_once_and_still_works():
    # Hide vidstream._C from the import system, as if it were never built.
    code = (
        "import sys, warnings, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vidstream._C': raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import vidstream\n"
        "    vidstream.backends()\n"
        "    x = torch.randn(1, 4, 2, 64)\n"
        "    y = vidstream.rope3d(x, grid=(1, 2, 2))\n"
        "msgs = [str(m.message) for m in w if 'vidstream._C' in str(m.message)]\n"
        "print(len(msgs), vidstream.backends(), vidstream.backend_for('rope3d', x))\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    count, *rest = r.stdout.split(maxsplit=1)
    assert count == "1", r.stdout
    assert "'cpu'" not in rest[0] and rest[0].strip().endswith("reference")


def test_two_generators_in_two_threads_keep_their_backends(monkeypatch):
    """A generator forced onto the reference beside one on the default kernels: every op call
    of each thread runs on its own thread's backend."""
    if "cpu" not in vidstream.backends():
        pytest.skip("needs the cpu backend")
    calls = {}

    def counting(op, name, fn):
        def wrapped(*args, **kwargs):
            calls.setdefault(threading.current_thread().name, set()).add(name)
            return fn(*args, **kwargs)
        return wrapped

    for op in testing.ops():
        entry = backend.op(op)
        for name, impl in list(entry.impls.items()):
            monkeypatch.setitem(entry.impls, name, backend.Implementation(counting(op, name, impl.fn)))
    model = vidstream.StreamingDiT("tiny", seed=0).eval()
    text = torch.randn(1, model.config.text_len, model.config.text_dim)
    barrier = threading.Barrier(2)
    results = {}

    def generate(forced):
        gen = vidstream.StreamingGenerator(model, chunk_frames=2, sink_frames=2, recent_frames=2,
                                           mid_blocks=2, top_k=1)
        barrier.wait()
        with vidstream.use_backend(forced) if forced else contextlib.nullcontext():
            results[threading.current_thread().name] = gen.generate(text, 10)

    threads = [threading.Thread(target=generate, args=(f,), name=n)
               for n, f in (("forced", "reference"), ("default", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == {"forced": {"reference"}, "default": {"cpu"}}
    torch.testing.assert_close(results["forced"], results["default"], atol=1e-4, rtol=1e-4)
