"""The sdist and the wheel, as a user gets them: ``python -m build`` makes the sdist from this tree
and the wheel from the sdist (the C++ extension compiled once, CPU kernels only:
``VIDSTREAM_BUILD_CUDA=0``, `make compile-check` covers the CUDA sources); each is checked for
what it must carry, the wheel is installed into a new venv that reuses the torch installed here
(a ``.pth`` file, no download), and from a folder outside the repository every op runs once on
its default CPU backend against ``vidstream.reference``, ``_C`` must load
(``VIDSTREAM_REQUIRE_C=1``), and the installed ``vidstream`` command answers ``--version`` and
``info``.

Cost: one compile of ``_C`` (about 1.5 min on 2 cores); the compiled objects are kept under
``build/packaging/`` so that a rerun on an unchanged tree only relinks. Skipped, with the reason,
without the ``build`` package or with ``VIDSTREAM_SKIP_PACKAGING=1``."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

import vidstream

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "packaging"  # the extracted sdist and its compiled objects, between runs
VERSION = vidstream.__version__
NAME = f"vidstream-{VERSION}"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
JUNK = ("__pycache__", ".pyc", ".so", ".o")


def builds(fn):
    """A test that needs the sdist and wheel built."""
    for mark in (
        pytest.mark.slow,
        pytest.mark.skipif(importlib.util.find_spec("build") is None,
                           reason="the `build` package is not installed (`pip install build`; "
                                  "`make test` installs it)"),
        pytest.mark.skipif(os.environ.get("VIDSTREAM_SKIP_PACKAGING", "") not in ("", "0"),
                           reason="VIDSTREAM_SKIP_PACKAGING is set"),
    ):
        fn = mark(fn)
    return fn


def _run(cmd, *, cwd=ROOT, env=None, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                               f"--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return r


def _tree(*parts: str, pattern: str = "*") -> set[str]:
    """The files of the tree under ``parts``, relative to the root, builds' leftovers aside."""
    base = ROOT.joinpath(*parts)
    return {p.relative_to(ROOT).as_posix() for p in base.rglob(pattern)
            if p.is_file() and not any(j in p.as_posix() for j in JUNK)}


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIDSTREAM_BACKEND", "TRITON_INTERPRET", "VIDSTREAM_REQUIRE_C")}
    return {**env, **extra}


@contextlib.contextmanager
def _locked(path: Path):
    """One packaging build at a time in this tree (two `make test` at once share build/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _extract(sdist: Path, dest: Path) -> None:
    """The sdist's files into ``dest``, replacing the last run's, whose compiled objects
    (build/temp.*) stay for ninja to reuse; build/lib.* goes, so that nothing stale is packed."""
    if dest.exists():
        for entry in dest.iterdir():
            if entry.name != "build":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in (dest / "build").iterdir() if (dest / "build").is_dir() else ():
            if not entry.name.startswith("temp."):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name.split("/", 1)[1] if "/" in m.name else ""
            if not rel or not (m.isfile() or m.isdir()):
                continue
            m.name = rel
            if hasattr(tarfile, "data_filter"):  # Python 3.12, and the security backports
                tar.extract(m, dest, filter="data")
            else:
                tar.extract(m, dest)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel, seconds each took)."""
    out = tmp_path_factory.mktemp("dist")
    env = _clean_env(VIDSTREAM_BUILD_CUDA="0")
    with _locked(WORK / ".lock"):
        t0 = time.perf_counter()
        _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT], env=env)
        (sdist,) = out.glob("*.tar.gz")
        t1 = time.perf_counter()
        src = WORK / NAME
        _extract(sdist, src)
        _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src], env=env)
        (wheel,) = out.glob("*.whl")
        t2 = time.perf_counter()
    print(f"\nsdist {t1 - t0:.0f} s, wheel from the sdist {t2 - t1:.0f} s")
    return sdist, wheel


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    """A new venv with the wheel installed, seeing this interpreter's torch through a .pth file."""
    _, wheel = dists
    path = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # Only the directories: the .pth files of this venv (the editable vidstream) are not run there.
    deps = dict.fromkeys([str(Path(torch.__file__).parent.parent), sysconfig.get_paths()["purelib"],
                          sysconfig.get_paths()["platlib"]])
    Path(purelib, "_vidstream_test_deps.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", wheel])
    return path


@builds
def test_sdist_carries_every_source(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    needed = (_tree("csrc") | _tree("triton_kernels", pattern="*.py") | _tree("vidstream", pattern="*.py")
              | {"LICENSE", "README.md", "docs/spec.md", "pyproject.toml", "setup.py", "MANIFEST.in",
                 "vidstream/py.typed", "vidstream/validated.json", "tests/conftest.py",
                 "tests/numerics.py"})
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    built = [n for n in names if n.endswith((".so", ".o", ".pyc")) or n in (
        "vidstream/_kernel_fingerprints.json", "vidstream/_build_info.json")]
    assert not built, f"build outputs in the sdist: {built}"
    assert any(n.endswith((".cu", ".cuh")) for n in names), "no CUDA sources in the sdist"


@builds
def test_wheel_contents_match_the_sources(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"{NAME}.dist-info/METADATA").decode()
        entry_points = z.read(f"{NAME}.dist-info/entry_points.txt").decode()
        fingerprints = json.loads(z.read("vidstream/_kernel_fingerprints.json"))["files"]
        build_info = json.loads(z.read("vidstream/_build_info.json"))
    package = {n for n in names if not n.startswith(f"{NAME}.dist-info/")}
    triton = {"vidstream/triton_kernels/" + Path(p).name for p in _tree("triton_kernels", pattern="*.py")}
    expected = (_tree("vidstream", pattern="*.py") | triton
                | {f"vidstream/_C{SUFFIX}", "vidstream/py.typed", "vidstream/validated.json",
                   "vidstream/_kernel_fingerprints.json", "vidstream/_build_info.json"})
    assert package == expected, (f"missing: {sorted(expected - package)}; "
                                 f"unexpected: {sorted(package - expected)}")
    assert f"{NAME}.dist-info/licenses/LICENSE" in names
    assert f"Version: {VERSION}\n" in meta and "License-Expression: Apache-2.0\n" in meta
    assert "vidstream = vidstream.cli:main" in entry_points
    # The sdist build compiled exactly this tree's C++ sources (headers included).
    cpp = {p for p in _tree("csrc") if p.count("/") == 1 or p.startswith("csrc/cpu/")}
    assert set(fingerprints) == cpp, f"compiled: {sorted(set(fingerprints) ^ cpp)} differ"
    changed = [p for p, h in fingerprints.items() if hashlib.sha256((ROOT / p).read_bytes()).hexdigest() != h]
    assert not changed, f"the sdist's copies differ from the tree: {changed}"
    assert build_info["torch"] == torch.__version__ and build_info["cuda_kernels"] is False


SMOKE = r'''
import importlib.metadata, os, sys
import torch
import vidstream
from vidstream import reference as ref

venv = sys.argv[1]
assert vidstream.__file__.startswith(venv), vidstream.__file__
assert vidstream.__version__ == importlib.metadata.version("vidstream")
assert vidstream._extension.load() and vidstream._extension.source_root() is None
assert os.path.exists(os.path.join(os.path.dirname(vidstream.__file__), "py.typed"))

g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g)
ranges = torch.tensor([[9, 14], [0, 4], [6, 6]], dtype=torch.int32)
x, pool = r(1, 12, 2, 16), r(2, 16, 2, 16)
delta = torch.tensor([1.5, -2.0, 3.0], dtype=torch.float64)
kp, vp, k, v = r(1, 20, 2, 16), r(1, 20, 2, 8), r(1, 8, 2, 16), r(1, 8, 2, 8)
slots, pos = torch.tensor([8, 0], dtype=torch.int32), torch.tensor([4.0, 5.0], dtype=torch.float64)
q, kk, vv = r(1, 18, 4, 16), r(1, 18, 2, 16), r(1, 18, 2, 16)
qc, kpool, vpool = r(1, 5, 4, 16), r(1, 16, 2, 16), r(1, 16, 2, 16)
qs = r(1, 6, 4, 16)
ql, c, wk, wv, kr = r(1, 3, 2, 12), r(1, 16, 8), r(2, 8, 8), r(2, 8, 6), r(1, 16, 4)
chunk = dict(frame_tokens=3, chunk_frames=2, sink_frames=1, window_frames=4, return_lse=True)


def store(fn):
    a, b = kp.clone(), vp.clone()
    fn(a, b, k, v, slots, pos, grid=(2, 2, 2))
    return a, b


cases = {
    "rope3d": (x, lambda f: f(x, grid=(2, 2, 3), frame_offset=5)),
    "rope3d_shift_": (pool, lambda f: f(pool.clone(), ranges, delta)),
    "rope3d_store_": (kp, store),
    "chunk_attention": (q, lambda f: f(q, kk, vv, **chunk)),
    "cached_attention": (qc, lambda f: f(qc, kpool, vpool, ranges, return_lse=True)),
    "select_blocks": (qs, lambda f: f(qs, kpool, ranges, 2, query_stride=2)),
    "lowrank_decompress": (c, lambda f: f(c, wk, wv, ranges, k_r_pool=kr)),
    "lowrank_cached_attention": (ql, lambda f: f(ql, c, wk, wv, ranges, k_r_pool=kr)),
}
assert set(cases) == set(vidstream.default_backends("cpu", torch.float32)), "an op without a smoke case"
for name, (probe, call) in cases.items():
    assert vidstream.backend_for(name, probe) == "cpu", (name, vidstream.backend_for(name, probe))
    torch.testing.assert_close(call(getattr(vidstream, name)), call(getattr(ref, name)),
                               atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
from vidstream.info import info_text
print(info_text())
print("SMOKE OK", len(cases))
'''


@builds
def test_installed_wheel_runs_every_op_outside_the_repo(venv, tmp_path):
    script = tmp_path / "smoke.py"
    script.write_text(SMOKE)
    r = _run([venv / "bin" / "python", script, venv.resolve()], cwd=tmp_path,
             env=_clean_env(VIDSTREAM_REQUIRE_C="1"), timeout=300)
    assert "SMOKE OK 8" in r.stdout
    assert "vidstream._C:     loaded" in r.stdout and "installed package" in r.stdout


@builds
def test_installed_command(venv, tmp_path):
    exe = venv / "bin" / "vidstream"
    assert exe.exists(), "the wheel installs no `vidstream` command ([project.scripts])"
    env = _clean_env()
    version = _run([exe, "--version"], cwd=tmp_path, env=env, timeout=300)
    assert VERSION in version.stdout
    info = _run([exe, "info"], cwd=tmp_path, env=env, timeout=300)
    assert f"vidstream:        {VERSION}" in info.stdout and "vidstream._C:     loaded" in info.stdout


def test_build_system_floor_matches_the_metadata():
    """A PEP 639 license expression (``license = "Apache-2.0"``) and ``license-files`` need
    setuptools >= 77: an older one rejects the metadata ("project.license must be valid exactly by
    one definition")."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    from packaging.requirements import Requirement
    from packaging.version import Version

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = {r.name: r for r in map(Requirement, meta["build-system"]["requires"])}
    assert isinstance(meta["project"]["license"], str) and "license-files" in meta["project"]
    floor = [Version(s.version) for s in reqs["setuptools"].specifier if s.operator == ">="]
    assert floor and max(floor) >= Version("77"), reqs["setuptools"]
    assert "version" in meta["project"]["dynamic"]  # vidstream.__version__ is the one source
