"""Build vidstream and its extension ``vidstream._C``.

The C++ CPU kernels are always built.  The CUDA kernels are built when
``VIDSTREAM_BUILD_CUDA`` is ``1``, or when it is ``auto`` (the default) and the installed
torch has CUDA and ``nvcc`` is found.  Build against the torch already installed::

    pip install --no-build-isolation -e .
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
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


def main():
    from torch.utils.cpp_extension import BuildExtension

    _max_jobs()
    setup(
        packages=["vidstream", "vidstream.triton_kernels"],
        package_dir={"vidstream": "vidstream", "vidstream.triton_kernels": "triton_kernels"},
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
