#!/usr/bin/env bash
# Compile checks that need nvcc but no GPU and no CUDA build of torch:
#  1. the torch-free kernels of csrc/kernels/ for sm_80 and sm_90a (CMake);
#  2. a syntax check of the CUDA bindings csrc/cuda/*.cpp against torch's headers. A CPU
#     wheel of torch lacks one generated header of c10/cuda, stubbed here.
# Usage: tools/compile_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
command -v nvcc >/dev/null || { echo "compile_check: nvcc not found, skipped"; exit 0; }
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
echo "compile_check: ok"
