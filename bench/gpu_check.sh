#!/usr/bin/env bash
# One run on a lent GPU: build the CUDA extension, run the whole test suite on CUDA, run
# compute-sanitizer (memcheck) on the kernel tests, run every benchmark, and gather everything in
# $OUT/gpu_check.json (plus logs). Commit what it measured to bench/results/.
#
#   bash bench/gpu_check.sh                 # on the device machine ($OUT set by the tool)
#   OUT=/tmp/gpu bash bench/gpu_check.sh    # anywhere else with a CUDA GPU
#
# Environment: PYTHON (default python3, the one with CUDA torch), SKIP_SANITIZER=1, QUICK=1
# (smaller benchmark shapes where a benchmark offers --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$work/nvidia-smi.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build (VIDSTREAM_BUILD_CUDA=1)"
if ! VIDSTREAM_BUILD_CUDA=1 make build PYTHON="$PY" VENV= > "$work/build.log" 2>&1; then
  tail -50 "$work/build.log"; echo "build failed"; cp "$work/build.log" "$OUT/"; exit 1
fi
"$PY" -c "import vidstream; print('backends on cuda:', vidstream.backends('cuda'))"

step "test suite on CUDA"
"$PY" -m pytest tests -q -rs --junitxml="$work/pytest.xml" 2>&1 | tee "$OUT/pytest.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "${SKIP_SANITIZER:-0}" != 1 ] && command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck on the CUDA kernel tests"
  # Without the caching allocator every buffer is its own allocation, so memcheck sees
  # out-of-bounds accesses that would otherwise land inside a cached block.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    --print-limit 20 "$PY" -m pytest tests -q -x -k "cuda and not compile" -p no:cacheprovider \
    > "$OUT/sanitizer.log" 2>&1
  san=$?
  tail -5 "$OUT/sanitizer.log"
  [ $san -eq 0 ] || { echo "sanitizer exit $san"; status=1; }
else
  san=-1
fi

step "benchmarks"
mkdir -p "$work/bench"
for b in bench/bench_*.py; do
  echo "--- $b"
  extra=()
  [ "${QUICK:-0}" = 1 ] && grep -q -- "--quick" "$b" && extra+=(--quick)
  timeout 600 "$PY" "$b" --device cuda --json "$work/bench/" "${extra[@]}" 2>&1 | tee -a "$OUT/bench.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$b failed"; status=1; }
done

step "gather"
"$PY" - "$work" "$OUT/gpu_check.json" "$status" "$san" <<'PY'
import glob, json, os, subprocess, sys, xml.etree.ElementTree as ET
work, out, status, san = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
suite = ET.parse(os.path.join(work, "pytest.xml")).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
benches = {}
for f in sorted(glob.glob(os.path.join(work, "bench", "*.json"))):
    with open(f) as fh:
        d = json.load(fh)
    benches[d["benchmark"]] = d
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
record = {
    "command": "bash bench/gpu_check.sh",
    "commit": commit,
    "nvidia_smi": open(os.path.join(work, "nvidia-smi.txt")).read(),
    "tests": tests,
    "sanitizer_exit": san,
    "ok": status == 0,
    "benchmarks": benches,
}
with open(out, "w") as fh:
    json.dump(record, fh, indent=2)
print(f"wrote {out}: tests {tests}, sanitizer exit {san}, benchmarks {sorted(benches)}")
PY
exit $status
