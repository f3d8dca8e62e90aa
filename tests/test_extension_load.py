"""When ``vidstream._C`` does not load: one warning, at the user's ``import vidstream``, that says
the real cause (the file is missing / built for another Python / built against another torch / a
library it needs is missing) and the fix for the way vidstream was installed (a source checkout:
rebuild; an installed copy: a wheel built for this torch); ``VIDSTREAM_REQUIRE_C=1`` makes it an
ImportError. Each case runs ``import vidstream`` in a subprocess, from a copy of the package."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import vidstream
from vidstream import _extension

PACKAGE = Path(vidstream.__file__).resolve().parent
TRITON_KERNELS = Path(importlib.util.find_spec("vidstream.triton_kernels").submodule_search_locations[0])
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
IMPORT_LINE = 9  # of USER below: `import vidstream`

USER = '''import json
import sys
import warnings

# Only the copy: not also the editable install's finder, which would serve the tree's _C.
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vidstream
    import torch
    vidstream._extension.load()  # again: no second warning
    vidstream.rope3d(torch.zeros(1, 4, 1, 8), grid=(1, 2, 2))
mine = [w for w in caught if "vidstream._C" in str(w.message)]
print(json.dumps({
    "file": vidstream.__file__,
    "warnings": [{"message": str(w.message), "category": w.category.__name__,
                  "filename": w.filename, "lineno": w.lineno} for w in mine],
    "rope3d": vidstream.backend_for("rope3d", torch.zeros(1, 4, 1, 8)),
}))
'''


def _copy(tmp: Path, *, checkout: bool = False) -> Path:
    """A copy of the package in ``tmp`` without ``_C`` (in a source checkout: a setup.py and csrc/
    beside it), and the user's script that imports it; returns the copy's package folder."""
    junk = shutil.ignore_patterns("_C.*", "__pycache__", "_build_info.json", "_kernel_fingerprints.json")
    shutil.copytree(PACKAGE, tmp / "vidstream", ignore=junk)
    shutil.copytree(TRITON_KERNELS, tmp / "vidstream" / "triton_kernels", ignore=junk)
    if checkout:
        (tmp / "setup.py").write_text("")
        (tmp / "csrc").mkdir()
    (tmp / "user.py").write_text(USER)
    return tmp / "vidstream"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", _extension.REQUIRE_ENV)}
    return {**env, **extra}


def _import(tmp: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "user.py"], cwd=tmp, env=_env(**env), capture_output=True,
                          text=True, timeout=300)


def _warned(tmp: Path) -> tuple[str, dict]:
    """The one warning the import gave, and the script's report."""
    r = _import(tmp)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().parent == (tmp / "vidstream").resolve(), report["file"]
    assert len(report["warnings"]) == 1, report["warnings"]
    (w,) = report["warnings"]
    assert w["category"] == "RuntimeWarning"
    # Attributed to the user's import line, not to the vidstream module that first needed _C.
    assert (Path(w["filename"]).resolve(), w["lineno"]) == ((tmp / "user.py").resolve(), IMPORT_LINE), w
    assert report["rope3d"] == "reference"  # the CPU fallback
    return w["message"], report


def _shared_lib(tmp: Path, out: Path, body: str, *link: str) -> None:
    cc = shutil.which(os.environ.get("CC", "")) or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to make a broken _C with")
    src = tmp / "broken.c"
    src.write_text(body)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src), *link], check=True,
                   capture_output=True, timeout=120)


def test_missing_file_in_an_installed_copy(tmp_path):
    _copy(tmp_path)
    msg, _ = _warned(tmp_path)
    assert f"the file is missing ({(tmp_path / 'vidstream').resolve()}/ has no _C{SUFFIX}" in msg, msg
    assert "carries no compiled extension" in msg
    assert "circular" not in msg
    assert f"reinstall vidstream from a wheel built for torch {torch.__version__}" in msg
    assert "-e " not in msg and "make build" not in msg
    assert "VIDSTREAM_REQUIRE_C=1" in msg


def test_missing_file_in_a_source_checkout(tmp_path):
    _copy(tmp_path, checkout=True)
    msg, _ = _warned(tmp_path)
    assert "the file is missing" in msg and "not been built in this checkout" in msg, msg
    assert f"`make build` in {tmp_path.resolve()}" in msg
    assert f"`pip install --no-build-isolation -e {tmp_path.resolve()}`" in msg
    assert "wheel" not in msg


def test_built_for_another_python(tmp_path):
    pkg = _copy(tmp_path)
    (pkg / "_C.cpython-38-x86_64-linux-gnu.so").write_bytes(b"")
    msg, _ = _warned(tmp_path)
    assert "_C.cpython-38-x86_64-linux-gnu.so, built for another Python" in msg, msg


def test_built_against_another_torch(tmp_path):
    """The dynamic loader's 'undefined symbol' is how a torch mismatch shows: say which torch _C
    was built for and which one runs."""
    pkg = _copy(tmp_path)
    _shared_lib(tmp_path, pkg / f"_C{SUFFIX}",
                "extern void _ZN3c1019vidstream_test_goneEv(void);\n"
                "void PyInit__C(void) { _ZN3c1019vidstream_test_goneEv(); }\n")
    (pkg / "_build_info.json").write_text(json.dumps({"version": 1, "torch": "2.4.0+cu121"}))
    msg, _ = _warned(tmp_path)
    assert (f"it was built against torch 2.4.0+cu121 and this is torch {torch.__version__}" in msg), msg
    assert "undefined symbol _ZN3c1019vidstream_test_goneEv" in msg
    assert "reinstall vidstream from a wheel built for torch" in msg


def test_missing_shared_library(tmp_path):
    pkg = _copy(tmp_path)
    lib = tmp_path / "libvidstream_gone.so"
    _shared_lib(tmp_path, lib, "void vidstream_gone(void) {}\n")
    _shared_lib(tmp_path, pkg / f"_C{SUFFIX}", "extern void vidstream_gone(void);\n"
                "void PyInit__C(void) { vidstream_gone(); }\n", f"-L{tmp_path}", "-lvidstream_gone")
    lib.unlink()
    msg, _ = _warned(tmp_path)
    assert "a library it links against cannot be found: libvidstream_gone.so" in msg, msg


def test_require_c_turns_the_fallback_into_an_import_error(tmp_path):
    _copy(tmp_path)
    r = _import(tmp_path, VIDSTREAM_REQUIRE_C="1")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: vidstream: the compiled extension vidstream._C did not load "
                           "and VIDSTREAM_REQUIRE_C is set: the file is missing"), r.stderr


@pytest.mark.skipif(not _extension.load(), reason="vidstream._C is not built here")
def test_require_c_passes_when_c_loads():
    r = subprocess.run([sys.executable, "-c", "import vidstream; print(vidstream._extension.load())"],
                       env=_env(VIDSTREAM_REQUIRE_C="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    assert _extension.failure() is None


def test_build_info_names_the_running_torch():
    info = _extension.build_info()
    if info is None:
        pytest.skip("no vidstream/_build_info.json: _C built by an older setup.py, or not built")
    assert info["torch"] == torch.__version__, "the _C here was built against another torch"
    assert info["python"] == sysconfig.get_python_version() or info["python"].startswith(
        sysconfig.get_python_version())
