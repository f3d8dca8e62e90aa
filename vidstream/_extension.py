"""Loads the compiled extension ``vidstream._C`` once. Without it vidstream still imports and
runs on its other backends, after one warning that says why it did not load and how to fix that
for the way vidstream was installed. ``VIDSTREAM_REQUIRE_C=1`` makes that an ``ImportError``
instead (for CI: a numerics check must not silently test the reference)."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch

REQUIRE_ENV = "VIDSTREAM_REQUIRE_C"
PACKAGE = Path(__file__).resolve().parent
BUILD_INFO = PACKAGE / "_build_info.json"  # written by setup.py beside the _C it built

_loaded = None
_error: str | None = None  # why _C did not load: the cause, in words
_kernels: dict[str, frozenset] = {}  # dispatch key -> ops with a kernel for it


def build_info() -> dict | None:
    """What setup.py recorded when it built ``_C``: the torch it was built against, its flags
    (None when there is no record: never built, or built by an older setup.py)."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None


def source_root() -> Path | None:
    """The source checkout this package runs from (an editable install, or the tree on
    ``sys.path``), None for an installed copy (a wheel, or an sdist built into site-packages)."""
    root = PACKAGE.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _built_torch() -> str:
    info = build_info()
    return info["torch"] if info and info.get("torch") else "an unrecorded torch version"


def _cause(e: BaseException | None) -> str:
    """Why ``_C`` did not load: ``e`` is the import's error, None when there is no file."""
    running = torch.__version__
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    if e is None:
        others = sorted(p.name for p in PACKAGE.glob("_C.*") if p.suffix in (".so", ".pyd"))
        if others:
            return (f"{PACKAGE}/ has {', '.join(others)}, built for another Python: this Python "
                    f"{sys.version.split()[0]} loads _C{suffix}")
        what = "it has not been built in this checkout" if source_root() else (
            "this install of vidstream carries no compiled extension")
        return f"the file is missing ({PACKAGE}/ has no _C{suffix}: {what})"
    msg = str(e)
    info = build_info()
    symbol = re.search(r"undefined symbol: (\S+)", msg)
    if symbol:
        git = getattr(torch.version, "git_version", None)
        built, here = _built_torch(), running
        if info and info.get("torch") == running and info.get("torch_git") not in (None, git):
            built, here = f"{built} (git {info['torch_git'][:12]})", f"{here} (git {str(git)[:12]})"
        elif info and info.get("torch") == running:
            return (f"undefined symbol {symbol.group(1)}, although it was built against this torch "
                    f"({running}): a stale or mixed build")
        return (f"it was built against torch {built} and this is torch {here}: a C++ extension "
                f"only loads in the torch it was compiled against (undefined symbol "
                f"{symbol.group(1)})")
    missing_lib = re.search(r"(\S+): cannot open shared object file", msg)
    if missing_lib:
        lib = missing_lib.group(1)
        if info and info.get("cuda_kernels") and torch.version.cuda is None:
            return (f"it was built with CUDA kernels against torch {_built_torch()}, and this torch "
                    f"({running}) has no CUDA: {lib} is not there")
        return f"a library it links against cannot be found: {lib}"
    return f"{type(e).__name__}: {msg}"


def _fix() -> str:
    running = torch.__version__
    root = source_root()
    if root is not None:
        return (f"rebuild it against the running torch {running}: `make build` in {root}, or "
                f"`pip install --no-build-isolation -e {root}`")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (f"reinstall vidstream from a wheel built for torch {running} and Python {py}, or build "
            "one here against the torch installed: `pip install --no-build-isolation --no-deps "
            "--force-reinstall vidstream-<version>.tar.gz`")


def failure() -> str | None:
    """Why ``vidstream._C`` did not load, and the fix (None when it loaded or was not tried)."""
    return _error


def _stacklevel() -> int:
    """The ``stacklevel`` for a warning raised in ``load`` that names the first frame outside
    vidstream: the user's ``import vidstream``, not the module that first needed ``_C``.
    importlib's own frames are not counted: ``warnings`` skips them by itself."""
    level, frame = 1, sys._getframe(2)  # the caller of load()
    package = str(PACKAGE) + os.sep
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):
            level += 1
            if not str(Path(name).resolve()).startswith(package):
                return level
        frame = frame.f_back
    return 2


def _import_c() -> BaseException | None:
    """Import ``vidstream._C``; the error, or None when it loaded."""
    name = f"{__package__}._C"
    try:
        # find_spec first: a missing file is told apart from a file that fails to load. A finder
        # may itself raise ImportError; that is the import failing, not a missing file.
        if importlib.util.find_spec(name) is None:
            return ModuleNotFoundError(f"No module named {name!r}", name=name)
        importlib.import_module(name)
    except (ImportError, OSError) as e:
        return e
    return None


def load() -> bool:
    """True when ``vidstream._C`` (and so ``torch.ops.vidstream``) is available."""
    global _loaded, _error
    if _loaded is None:
        e = _import_c()
        _loaded = e is None
        if not _loaded:
            missing = isinstance(e, ModuleNotFoundError) and e.name == f"{__package__}._C"
            _error = f"{_cause(None if missing else e)}. Fix: {_fix()}"
            if not required():
                warnings.warn(
                    f"vidstream: the compiled extension vidstream._C did not load: {_error}. "
                    "Until then the cpu and cuda backends are unavailable (CPU tensors run on the "
                    f"reference backend); set {REQUIRE_ENV}=1 to make this an error.",
                    RuntimeWarning,
                    stacklevel=_stacklevel(),
                )
    if not _loaded and required():
        raise ImportError(f"vidstream: the compiled extension vidstream._C did not load and "
                          f"{REQUIRE_ENV} is set: {_error}", name=f"{__package__}._C")
    return _loaded


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``vidstream::op`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA"). Looked up
    once, so that backend resolution inside torch.compile is plain Python."""
    if not load():
        return False
    if dispatch_key not in _kernels:
        names = torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
        _kernels[dispatch_key] = frozenset(n.split("::", 1)[1].split(".")[0] for n in names
                                           if n.startswith("vidstream::"))
    return op in _kernels[dispatch_key]


def built_with_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels (``VIDSTREAM_BUILD_CUDA``)."""
    return has_kernel("rope3d", "CUDA")


def register_fake(op: str):
    """``torch.library.register_fake`` for the C++ op ``vidstream::op``, skipped (with the op)
    when the extension did not load."""

    def wrap(fn):
        if load():
            torch.library.register_fake(f"vidstream::{op}")(fn)
        return fn

    return wrap
