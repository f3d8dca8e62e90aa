"""Build vidstream and its extension ``vidstream._C``.

The C++ CPU kernels are always built.  The CUDA kernels are built when
``VIDSTREAM_BUILD_CUDA`` is ``1``, or when it is ``auto`` (the default) and the installed
torch has CUDA and ``nvcc`` is found.  Build against the torch already installed::

    pip install --no-build-isolation -e .          # a source checkout (or `make build`)
    pip install --no-build-isolation vidstream-*.tar.gz

The sdist carries every source a build can need (MANIFEST.in); a wheel carries the built
``vidstream._C`` and, beside it, what it was built from and against (``_kernel_fingerprints.json``,
``_build_info.json``).
"""

import glob
import hashlib
import json
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# CUDA sources are not in the wheel: the runtime learns what was compiled in from this file, to
# match it against the record of GPU-validated kernels (vidstream/validation.py).
FINGERPRINTS = os.path.join("vidstream", "_kernel_fingerprints.json")
# The torch _C was built against, and how: `vidstream info` and the load-failure message read it
# (vidstream/_extension.py).
BUILD_INFO = os.path.join("vidstream", "_build_info.json")


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("VIDSTREAM_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"VIDSTREAM_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    have = torch.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None
    )
    if mode == "1" and not have:
        raise RuntimeError(
            "VIDSTREAM_BUILD_CUDA=1 but the installed torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found"
        )
    return mode == "1" or (mode == "auto" and have)


def _max_jobs():
    # nvcc on template-heavy kernels peaks near 4 GB a job; leave memory for the rest.
    if "MAX_JOBS" in os.environ:
        return
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    jobs = max(1, min(os.cpu_count() or 1, int(mem_gb // 4)))
    os.environ["MAX_JOBS"] = str(jobs)


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -g0: Python's CFLAGS carry -g, which made a 13 MB _C of which 0.5 MB is code.
    cxx = ["-O3", "-g0", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return [
            CppExtension(
                "vidstream._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
            )
        ]
    # sm_80 and sm_90a machine code, plus sm_80 PTX the driver can compile for newer GPUs.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;8.0+PTX")
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return [
        CUDAExtension(
            "vidstream._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("VIDSTREAM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


def _write_fingerprints(extensions, path):
    """sha256 of every csrc file compiled in: the sources, and the headers beside them (any of
    which they may include)."""
    sources = {os.path.relpath(os.path.join(ROOT, s), ROOT) for ext in extensions for s in ext.sources}
    dirs = {os.path.dirname(s) for s in sources}
    headers = {os.path.relpath(h, ROOT) for d in dirs for pattern in ("*.h", "*.cuh")
               for h in glob.glob(os.path.join(ROOT, d, pattern))}
    files = {}
    for rel in sorted(sources | headers):
        with open(os.path.join(ROOT, rel), "rb") as f:
            files[rel.replace(os.sep, "/")] = hashlib.sha256(f.read()).hexdigest()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        f.write("\n")


def _write_build_info(extensions, path):
    import torch

    ext = extensions[0]
    cuda = any(s.endswith(".cu") for s in ext.sources)
    info = {
        "version": 1,
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
        "python": platform.python_version(),
        "platform": sys.platform + "-" + platform.machine(),
        "cuda_kernels": cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None,
        "cxx_flags": ext.extra_compile_args.get("cxx", []),
        "nvcc_flags": ext.extra_compile_args.get("nvcc", []) if cuda else [],
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            # Only once the compile succeeded, and beside the _C it describes: a failed build
            # keeps the fingerprints of what the old _C holds.
            where = ROOT if self.inplace else self.build_lib
            _write_fingerprints(self.extensions, os.path.join(where, FINGERPRINTS))
            _write_build_info(self.extensions, os.path.join(where, BUILD_INFO))

    return BuildExt


def main():
    _max_jobs()
    setup(
        # Every subpackage (vidstream.ops, vidstream.streaming, ...), and the top-level
        # triton_kernels/ installed as vidstream.triton_kernels.
        packages=find_packages(include=["vidstream", "vidstream.*"]) + ["vidstream.triton_kernels"],
        package_dir={"vidstream": "vidstream", "vidstream.triton_kernels": "triton_kernels"},
        package_data={"vidstream": ["py.typed", "validated.json", "_kernel_fingerprints.json",
                                    "_build_info.json"]},
        ext_modules=_extensions(),
        cmdclass={"build_ext": _build_ext()},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
