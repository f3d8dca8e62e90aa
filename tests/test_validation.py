"""The record of GPU-validated kernels (vidstream/validated.json): fingerprints, matching, the
CUDA default it drives, the record/show command line and the introspection of defaults."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vidstream
from vidstream import backend, testing, validation

REPO = Path(__file__).resolve().parents[1]
GPU_OPS = [(op, b) for op in testing.ops() for b in validation.GPU_BACKENDS
           if b in testing.registered_backends(op)]


def entry(op, backend_name, sources, dtype="float16", arch="sm_90", **extra):
    return {"op": op, "backend": backend_name, "dtype": dtype, "arch": arch, "sources": sources,
            "commit": "0" * 40, "date": "2026-01-01T00:00:00Z", "device": "test GPU",
            "command": "pytest", **extra}


def record_of(*entries):
    return {"version": validation.VERSION, "entries": list(entries)}


def copy_sources(op, backend_name, dest):
    for rel in validation.SOURCES[(op, backend_name)]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, dest / rel)


# ----------------------------------------------------------------------------- the table


def test_every_gpu_kernel_has_a_source_table():
    assert sorted(GPU_OPS) == sorted(validation.SOURCES)
    for paths in validation.SOURCES.values():
        for rel in paths:
            assert (REPO / rel).is_file(), rel


def _include_closure(roots):
    seen, todo = set(), list(roots)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', (REPO / rel).read_text(), re.M):
            here = os.path.normpath(os.path.join(os.path.dirname(rel), inc))
            todo.append(here if (REPO / here).is_file() else os.path.join("csrc", inc))
    return seen


@pytest.mark.parametrize("op", [op for op, b in GPU_OPS if b == "cuda"])
def test_cuda_table_is_the_include_closure(op):
    """A header newly included by a kernel must join its table, or an edit to it would not
    un-validate the kernel."""
    table = set(validation.SOURCES[(op, "cuda")])
    csrc = {p for p in table if p.startswith("csrc/")}
    roots = [p for p in csrc if p.endswith((".cpp", ".cu"))]
    assert roots and _include_closure(roots) == csrc


@pytest.mark.parametrize("op", [op for op, b in GPU_OPS if b == "triton"])
def test_triton_table_holds_what_the_kernels_import(op):
    table = set(validation.SOURCES[(op, "triton")])
    for rel in [p for p in table if p.startswith("triton_kernels/")]:
        text = (REPO / rel).read_text()
        for mod in re.findall(r"^from \.(\w+) import", text, re.M):
            assert f"triton_kernels/{mod}.py" in table, (rel, mod)
        for mod in re.findall(r"^from vidstream\.([\w.]+) import", text, re.M):
            assert f"vidstream/{mod.replace('.', '/')}.py" in table, (rel, mod)


@pytest.mark.skipif(not (REPO / "triton_kernels").is_dir(), reason="not a source checkout")
def test_running_sources_are_hashed_from_the_package():
    for op, b in GPU_OPS:
        if b == "triton":
            assert validation.fingerprint(op, b) == validation.fingerprint(op, b, root=REPO), op


# ----------------------------------------------------------------------------- matching


@pytest.mark.parametrize("op,backend_name", [("cached_attention", "triton"),
                                             ("select_blocks", "cuda")])
def test_an_entry_validates_exactly_its_sources_dtype_and_arch(tmp_path, op, backend_name):
    copy_sources(op, backend_name, tmp_path)
    rec = record_of(entry(op, backend_name, validation.fingerprint(op, backend_name, root=tmp_path)))
    check = lambda dtype="float16", arch="sm_90": validation.is_validated(
        op, backend_name, dtype, arch, record=rec, root=tmp_path)
    assert check() and check(torch.float16)
    assert not check("bfloat16") and not check(arch="sm_80") and not check(arch=None)
    assert not validation.is_validated(op, "cuda" if backend_name == "triton" else "triton",
                                       "float16", "sm_90", record=rec, root=tmp_path)
    assert validation.explain(op, backend_name, "float16", "sm_90", record=rec,
                              root=tmp_path).startswith("validated on test GPU")
    first = validation.SOURCES[(op, backend_name)][0]  # a kernel file or a shared header
    edited = tmp_path / first
    data = bytearray(edited.read_bytes())
    data[len(data) // 2] ^= 1
    edited.write_bytes(bytes(data))
    assert not check()
    why = validation.explain(op, backend_name, "float16", "sm_90", record=rec, root=tmp_path)
    assert "changed since" in why and first in why


def test_a_missing_source_never_matches(tmp_path):
    copy_sources("rope3d", "triton", tmp_path)
    rec = record_of(entry("rope3d", "triton", validation.fingerprint("rope3d", "triton", root=tmp_path)))
    (tmp_path / "vidstream/ops/rope_math.py").unlink()
    assert not validation.is_validated("rope3d", "triton", "float16", "sm_90", record=rec,
                                       root=tmp_path)


# ----------------------------------------------------------------------------- the registry


class Cuda:
    device, dtype = torch.device("cuda"), torch.float16


@pytest.fixture
def pretend_gpu(monkeypatch, tmp_path):
    """A GPU of sm_90 on which every backend can run, a record at tmp_path/validated.json, and
    the CUDA sources of the tree as the ones compiled in. Returns a function writing the record."""
    monkeypatch.setattr(backend, "usable", lambda name, op, device, dtype: None)
    monkeypatch.setattr(backend, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(backend, "_validated_cache", {})
    monkeypatch.setattr(validation, "RECORD_PATH", tmp_path / "validated.json")
    csrc = {p: h for op, b in GPU_OPS if b == "cuda"
            for p, h in validation.fingerprint(op, b, root=REPO).items() if p.startswith("csrc/")}
    built = tmp_path / "_kernel_fingerprints.json"
    built.write_text(json.dumps({"version": 1, "files": csrc}))
    monkeypatch.setattr(validation, "KERNEL_FINGERPRINTS", built)

    def write(*entries):
        (tmp_path / "validated.json").write_text(json.dumps(record_of(*entries)))
        backend._validated_cache.clear()

    return write


def test_cuda_default_follows_the_record(pretend_gpu):
    op = "cached_attention"
    triton = entry(op, "triton", validation.fingerprint(op, "triton"))
    cuda = entry(op, "cuda", validation.fingerprint(op, "cuda"))
    pretend_gpu()
    assert vidstream.backend_for(op, Cuda) == "torch"
    pretend_gpu(triton)
    assert vidstream.backend_for(op, Cuda) == "triton"
    assert vidstream.backend_for("chunk_attention", Cuda) == "torch"  # one entry, one op
    assert backend.op(op).gpu_default(torch.bfloat16, "sm_90") == "torch"
    assert backend.op(op).gpu_default(torch.float16, "sm_80") == "torch"
    assert backend.op(op).gpu_default(torch.float16, None) == "torch"
    pretend_gpu(triton, cuda)
    assert vidstream.backend_for(op, Cuda) == "cuda"
    why = vidstream.default_backends("cuda", torch.float16)[op]
    assert why.backend == "cuda" and why.why.startswith("validated on test GPU at 000000000000")


def test_a_mismatching_entry_leaves_the_torch_backend(pretend_gpu):
    op = "select_blocks"
    sources = validation.fingerprint(op, "triton")
    stale = dict(sources, **{"triton_kernels/select_blocks.py": "0" * 64})
    pretend_gpu(entry(op, "triton", stale))
    assert vidstream.backend_for(op, Cuda) == "torch"
    choice = vidstream.default_backends("cuda", torch.float16)[op]
    assert choice.backend == "torch"
    assert "triton_kernels/select_blocks.py" in choice.why and "changed since" in choice.why
    assert "no entry for float16 on sm_90" in choice.why  # the cuda kernel's reason
    pretend_gpu(entry(op, "triton", {k: v for k, v in sources.items() if "_ieee" not in k}))
    assert vidstream.backend_for(op, Cuda) == "torch"  # a file the entry lacks


def test_cuda_kernels_need_the_build_fingerprints(pretend_gpu, monkeypatch, tmp_path):
    op = "rope3d"
    pretend_gpu(entry(op, "cuda", validation.fingerprint(op, "cuda")))
    assert vidstream.backend_for(op, Cuda) == "cuda"
    monkeypatch.setattr(validation, "KERNEL_FINGERPRINTS", tmp_path / "missing.json")
    backend._validated_cache.clear()
    assert vidstream.backend_for(op, Cuda) == "torch"


def test_the_lookup_is_kept_per_process(pretend_gpu, monkeypatch):
    op = "rope3d"
    pretend_gpu(entry(op, "triton", validation.fingerprint(op, "triton")))
    assert vidstream.backend_for(op, Cuda) == "triton"
    monkeypatch.setattr(validation, "fingerprint", lambda *a, **k: pytest.fail("hashed again"))
    assert vidstream.backend_for(op, Cuda) == "triton"


def test_the_lookup_is_a_constant_under_compile(monkeypatch):
    """Tracing the CUDA choice reads the record once at trace time, not in the graph."""
    monkeypatch.setattr(backend, "_validated_cache", {})  # a miss: the files are read
    rope = backend.op("rope3d")

    def f(x):
        name = rope.gpu_default(torch.float16, backend.device_arch(torch.device("cuda")))
        return x + (1 if backend.validated("rope3d", "triton", torch.float16, "sm_90") else 2), name

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert compiled(torch.zeros(2))[1] == f(torch.zeros(2))[1]


def test_gpu_validated_reads_the_record(pretend_gpu):
    op = "rope3d_store_"
    pretend_gpu(entry(op, "triton", validation.fingerprint(op, "triton"), dtype="bfloat16"))
    assert testing.gpu_validated(op, "triton", arch="sm_90")
    assert testing.gpu_validated(op, "triton", torch.bfloat16, "sm_90")
    assert not testing.gpu_validated(op, "triton", torch.float16, "sm_90")
    assert not testing.gpu_validated(op, "triton", arch="sm_80")
    assert not testing.gpu_validated(op, "cuda", arch="sm_90")


# ----------------------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vidstream.validation", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_record_writes_entries_and_show_reports_them(tmp_path):
    passed, out = tmp_path / "passed.json", tmp_path / "sub" / "validated.json"
    passed.write_text(json.dumps([{"op": "cached_attention", "backend": "triton", "dtype": "float16"},
                                  {"op": "rope3d", "backend": "triton", "dtype": "float32"}]))
    r = _cli("record", "--passed", passed, "--command", "bash bench/gpu_check.sh", "--out", out,
             "--arch", "sm_90", "--device-name", "test")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" or torch.cuda.is_available(), r.stderr
    arch = validation.arch_of("cuda") or "sm_90"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "test"
    rec = validation.load_record(out)
    assert [(e["op"], e["dtype"]) for e in rec["entries"]] == [("cached_attention", "float16"),
                                                               ("rope3d", "float32")]
    for e in rec["entries"]:
        assert set(e) == {"op", "backend", "dtype", "arch", "sources", "commit", "date", "device",
                          "command"}
        assert e["backend"] == "triton" and e["arch"] == arch and e["device"] == device
        assert e["sources"] == validation.fingerprint(e["op"], "triton")
        assert e["command"] == "bash bench/gpu_check.sh"
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", e["commit"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["date"])
        assert validation.is_validated(e["op"], "triton", e["dtype"], arch, record=rec)

    # Recording again replaces the entry of the same op, backend, dtype and arch.
    passed.write_text(json.dumps([{"op": "rope3d", "backend": "triton", "dtype": "float32"}] * 2))
    r = _cli("record", "--passed", passed, "--command", "again", "--out", out, "--arch", "sm_90",
             "--device-name", "test")
    assert r.returncode == 0, r.stderr
    rec = validation.load_record(out)
    assert [e["command"] for e in rec["entries"]] == ["bash bench/gpu_check.sh", "again"]

    r = _cli("show", "--record", out)
    assert r.returncode == 0, r.stderr
    assert "2 entries" in r.stdout
    assert re.search(r"cached_attention triton float16 \S+: matches", r.stdout), r.stdout


def test_record_refuses_what_it_cannot_fingerprint(tmp_path):
    out = tmp_path / "validated.json"
    bad = [{"op": "cached_attention", "backend": "torch", "dtype": "float16"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = _cli("record", "--passed", tmp_path / "bad.json", "--command", "x", "--out", out,
             "--arch", "sm_90", "--device-name", "test")
    assert r.returncode != 0 and "not a GPU kernel" in r.stderr and not out.exists()
    if None in validation.fingerprint("select_blocks", "cuda").values():  # built without CUDA
        cuda = [{"op": "select_blocks", "backend": "cuda", "dtype": "float16"}]
        (tmp_path / "cuda.json").write_text(json.dumps(cuda))
        r = _cli("record", "--passed", tmp_path / "cuda.json", "--command", "x", "--out", out,
                 "--arch", "sm_90", "--device-name", "test")
        assert r.returncode != 0 and "no fingerprint" in r.stderr and not out.exists()


def test_record_needs_an_arch_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the GPU gives the arch")
    (tmp_path / "p.json").write_text("[]")
    with pytest.raises(SystemExit, match="pass --arch"):
        validation.record_passed(tmp_path / "p.json", "x", tmp_path / "out.json",
                                 device_name="test")


# ----------------------------------------------------------------------------- shipped record


def test_the_shipped_record_parses_and_names_real_kernels():
    rec = validation.load_record()
    assert rec["version"] == validation.VERSION
    for e in rec["entries"]:
        assert e["backend"] in testing.registered_backends(e["op"]), e
        assert (e["op"], e["backend"]) in validation.SOURCES, e
        assert e["dtype"] in validation.DTYPES and re.fullmatch(r"sm_\d+a?", e["arch"]), e
        assert set(e["sources"]) == set(validation.SOURCES[(e["op"], e["backend"])]), e
        assert {"commit", "date", "device", "command"} <= set(e), e


def test_default_backends_without_cuda_names_torch_with_a_reason():
    if torch.cuda.is_available():
        pytest.skip("answers for the GPU that is here")
    defaults = vidstream.default_backends("cuda")
    assert sorted(defaults) == sorted(testing.ops())
    for op, choice in defaults.items():
        assert choice.backend == "torch", op
        assert "no CUDA device here" in choice.why and str(choice).startswith("torch: ")
    cpu = vidstream.default_backends("cpu", torch.float64)
    assert {c.backend for c in cpu.values()} == {"reference"}
    assert all("float64" in c.why for c in cpu.values())


def test_backends_command(capsys):
    from vidstream import cli

    assert cli.main(["backends", "--device", "cuda", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 cuda" in out
    for op, choice in vidstream.default_backends("cuda", torch.bfloat16).items():
        assert re.search(rf"{re.escape(op)}\s+{choice.backend}\s+", out), op
