#!/usr/bin/env bash
# Compile checks that need no GPU and no CUDA build of torch:
#  1. the torch-free kernels of csrc/kernels/ for sm_80 and sm_90a (CMake; needs nvcc);
#  2. a syntax check of the CUDA bindings csrc/cuda/*.cpp against torch's headers (needs nvcc's
#     headers). A CPU wheel of torch lacks one generated header of c10/cuda, stubbed here;
#  3. every Triton kernel compiled ahead of time for sm_90 (tools/triton_aot_check.py) with the
#     triton of the GPU machines, TRITON_AOT_VERSION (default 3.6.0; set empty to skip). That
#     triton lives in a small venv of its own, build/triton-<version>, made once (pip, ~10 s,
#     ~700 MB); torch and vidstream come from the Python given here through a .pth file, behind
#     the venv's own triton on sys.path. Skipped with a message when pip cannot fetch it
#     (offline). TRITON_AOT_ARGS: more arguments ("--configs all --timeout 0": the full check).
# Usage: tools/compile_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}

cuda_checks() {
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/cmake -j2
  # nvcc may be a wrapper script outside the toolkit: find the folder that has the runtime headers.
  cuda_home=${CUDA_HOME:-}
  for d in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    [ -z "$cuda_home" ] && [ -f "$d/include/cuda_runtime_api.h" ] && cuda_home=$d
  done
  stub=build/stub-include
  mkdir -p "$stub/c10/cuda/impl"
  echo '#pragma once' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
  includes=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
  for f in csrc/cuda/*.cpp; do
    [ -e "$f" ] || continue
    echo "syntax check $f"
    # shellcheck disable=SC2086
    g++ -std=c++17 -fsyntax-only -w $includes -I"$stub" -I"$cuda_home/include" -Icsrc -DVIDSTREAM_WITH_CUDA "$f"
  done
}

triton_aot() {
  local ver=${TRITON_AOT_VERSION-3.6.0}
  if [ -z "$ver" ]; then
    echo "compile_check: TRITON_AOT_VERSION is empty, Triton ahead-of-time check skipped"
    return 0
  fi
  local venv=build/triton-$ver t0=$SECONDS pyver site pth
  local aot_py=$venv/bin/python
  pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$("$aot_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" != "$pyver" ]; then
    rm -rf "$venv"
    "$PY" -m venv "$venv" || {
      echo "compile_check: cannot create a venv with $PY; Triton ahead-of-time check skipped"
      return 0
    }
  fi
  site=$("$aot_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  pth=$site/_vidstream_outer_env.pth
  if ! [ -d "$site/triton-$ver.dist-info" ]; then
    rm -f "$pth"  # pip must see this venv alone, not the outer triton
    "$aot_py" -m pip install -q --disable-pip-version-check --timeout 20 --retries 1 \
        "triton==$ver" || {
      echo "compile_check: pip cannot fetch triton==$ver (offline?); Triton ahead-of-time check skipped"
      return 0
    }
  fi
  "$PY" -c 'import os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
print("import site; " + "; ".join("site.addsitedir(%r)" % d for d in dirs if os.path.isdir(d)))' > "$pth"
  "$aot_py" -c "import torch, triton, vidstream
assert triton.__version__ == '$ver', triton.__file__
print('compile_check: triton', triton.__version__, 'torch', torch.__version__)"
  local t1=$SECONDS
  # shellcheck disable=SC2086  # TRITON_AOT_ARGS is a list of arguments
  "$aot_py" tools/triton_aot_check.py --arch 90 ${TRITON_AOT_ARGS:-}
  echo "compile_check: Triton ahead-of-time check: $((t1 - t0)) s venv, $((SECONDS - t1)) s compile"
}

if command -v nvcc >/dev/null; then
  cuda_checks
else
  echo "compile_check: nvcc not found, CUDA kernels and bindings skipped"
fi
triton_aot
echo "compile_check: ok"
