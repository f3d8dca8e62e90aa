#!/usr/bin/env bash
# shellcheck disable=SC2329  # the stage functions are called through stage()
# bench/gpu_check.sh: the GPU check of vidstream, in stages that fit one 10-minute command on a lent
# GPU (one H200 here; 15 minutes of device time in all, the machine's start included).
#
#   bash bench/gpu_check.sh                   # on the device machine, from the repository root,
#                                             # $OUT set by the tool (run it with timeout_s=600)
#   OUT=/tmp/gpu bash bench/gpu_check.sh      # anywhere else with a CUDA GPU
#   bash bench/gpu_check.sh --stages a,b,e    # some stages only (the others are listed as skipped)
#   bash bench/gpu_check.sh --dry-run         # the same machinery on CPU tensors, ~1 minute here
#                                             # (tests/test_gpu_check.py runs it in CI)
#
# Stages, each under its own timeout (seconds; GPU / --dry-run), each appending one JSON line
# (stage, status ok|fail|timeout|skipped, seconds, key numbers, log) to $OUT/stages.jsonl the
# moment it ends, so a run cut short keeps what finished:
#   a  environment (nvidia-smi, torch / triton / nvcc versions) and the CUDA build for this GPU's
#      architecture only (TORCH_CUDA_ARCH_LIST from the device capability, 9.0a on an H200)   180 / 30
#   b  the gpu_smoke tests (tests/test_gpu_smoke.py: every op x backend x dtype on CUDA tensors,
#      the streaming equivalence), one Triton config (VIDSTREAM_TRITON_AUTOTUNE=first)        120 / 60
#   c  compute-sanitizer memcheck over the smoke tests of the cuda backend, no caching
#      allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1)                                            60 / skipped
#   d  headline benchmarks (--headline; --tiny on the CPU in a dry run): attention, RoPE,
#      select_blocks, low-rank, offsets, backward, wan-1.3b streaming eager and compiled     180 / 60
#   e  the validation record: every op x backend x dtype whose smoke test passed (cuda: and
#      its sanitizer run), through `python -m vidstream.validation record`; a dry run records
#      for the architecture sm_0, which no GPU has                                              25 / 30
# The whole run stops at GPU_CHECK_BUDGET_S (540 s; 150 in a dry run): a stage gets what is left
# of it, keeping time for stage e. Override a stage's limit with GPU_CHECK_T_<A..E>.
#
# $OUT holds at most 6 files (the device tool returns 8 at most, two folders deep):
#   stages.jsonl      one line per stage          summary.md     the table printed at the end
#   passed.json       the passing entries (e)     validated.json the record stage e wrote
#   bench.tar.gz      the benchmarks' JSON         logs.tar.gz    every log and junit xml
#
# To commit the results of a GPU run (files_at = where the tool put $OUT's files):
#   mkdir -p bench/results/gpu-h200
#   tar -xzf "$files_at/bench.tar.gz" -C bench/results/gpu-h200
#   cp "$files_at/summary.md" "$files_at/stages.jsonl" bench/results/gpu-h200/
#   cp "$files_at/validated.json" vidstream/validated.json
#
# Environment: PYTHON (default python3; .venv/bin/python in a dry run when present), OUT,
# GPU_CHECK_BUDGET_S, GPU_CHECK_T_A..E, SMOKE_WORKERS (pytest-xdist workers in stage b on a GPU,
# default 8, 0 for none), SANITIZER_ARGS (more compute-sanitizer options), VIDSTREAM_TEST_SEED,
# GPU_CHECK_AUTOTUNE (all: let the benchmarks autotune Triton, default first), STREAM_FRAMES
# (default 12), STREAM_COMPILED_CONFIGS (default no-mid), KEEP_WORK=1.
# VIDSTREAM_COMMIT: the commit the record names where the tree is a copy without .git (the device
# tool's is): run it as `VIDSTREAM_COMMIT=<git rev-parse HEAD here> bash bench/gpu_check.sh`.
# Stages b-e use the build of stage a: on a fresh machine, run a with them.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

usage() { sed -n '3,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY_RUN=0
STAGES="a,b,c,d,e"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --stages) [ $# -ge 2 ] || { echo "--stages needs a list such as a,b,d" >&2; exit 2; }
              STAGES=$2; shift ;;
    --stages=*) STAGES=${1#--stages=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case ",$STAGES," in
  *[!abcde,]*|,,) echo "--stages takes letters among a,b,c,d,e, got '$STAGES'" >&2; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
OUT=${OUT:-out/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/stages.jsonl" "$OUT/summary.md" "$OUT/passed.json" "$OUT/validated.json" \
  "$OUT/bench.tar.gz" "$OUT/logs.tar.gz"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/bench"
export PYTHONUNBUFFERED=1
SEED=${VIDSTREAM_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}
if [ "$DRY_RUN" = 1 ]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-150}
  T_A=${GPU_CHECK_T_A:-30}; T_B=${GPU_CHECK_T_B:-60}; T_C=${GPU_CHECK_T_C:-5}
  T_D=${GPU_CHECK_T_D:-60}; T_E=${GPU_CHECK_T_E:-30}
else
  BUDGET=${GPU_CHECK_BUDGET_S:-540}
  T_A=${GPU_CHECK_T_A:-180}; T_B=${GPU_CHECK_T_B:-120}; T_C=${GPU_CHECK_T_C:-60}
  T_D=${GPU_CHECK_T_D:-180}; T_E=${GPU_CHECK_T_E:-25}
fi
# Dry run: the smoke tests that run in seconds here (no Triton interpreter but one op, whose
# entry stage e then records).
DRY_SMOKE_K=${DRY_SMOKE_K:-not triton or rope3d-triton-float32}

now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }
T0=$(now_ms)
elapsed_s() { echo $(( ($(now_ms) - T0) / 1000 )); }

# ----------------------------------------------------------------------------- helpers (Python)
# Standard library only (no torch import): JSON lines, junit xml, benchmark numbers, summary.
HELP=$WORK/gpu_check_helper.py
cat > "$HELP" <<'PYHELP'
import glob, json, os, re, sys
import xml.etree.ElementTree as ET

def cases(path):
    """{test name: 'passed' | 'failed' | 'skipped'} of a junit xml ({} when absent or broken)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    out = {}
    for tc in root.iter("testcase"):
        kids = {c.tag for c in tc}
        state = "failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed"
        if out.get(tc.get("name")) != "failed":
            out[tc.get("name")] = state
    return out

def counts(path):
    c = cases(path)
    return {k: sum(1 for v in c.values() if v == k) for k in ("passed", "failed", "skipped")}

def bench_numbers(path):
    """The few numbers of one benchmark JSON worth a glance."""
    with open(path) as f:
        d = json.load(f)
    rows, name = d.get("rows", []), os.path.basename(path)[:-5]
    r3 = lambda v: None if v is None else round(v, 3)
    if name.startswith("attention"):
        return {f"{r['form']} {r['impl']} ms": r3(r["ms"]) for r in rows}
    if name == "rope":
        n = {f"{r['op']} {r['impl']} GBps": r3(r["GBps"]) for r in rows}
        if "copy_GBps" in d:
            n["copy GBps"] = r3(d["copy_GBps"])
        return n
    if name.startswith("bench_select"):
        return {f"{r['name']} [{r['backend']}] ms": r3(r["ms"]) for r in rows}
    if name.startswith("bench_lowrank"):
        return {f"{r['method']} ms": r3(r["ms"]) for r in rows}
    if name.startswith("bench_stream"):
        return {f"{r['config']} frames/s": r3(r["frames_per_s"]) for r in rows}
    return {}

def main(cmd, *a):
    if cmd == "record":  # out id name status seconds limit log numbers_file note dry
        out, sid, name, status, secs, limit, log, nfile, note, dry = a
        numbers = {}
        if nfile and os.path.exists(nfile):
            with open(nfile) as f:
                numbers = json.load(f)
        line = {"stage": sid, "name": name, "status": status, "seconds": round(float(secs), 1),
                "limit_s": int(limit), "log": log or None, "numbers": numbers, "note": note or None,
                "dry_run": dry == "1"}
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")
    elif cmd == "junit":  # xml numbers_file [key=value ...]
        n = counts(a[0])
        for kv in a[2:]:
            k, v = kv.split("=", 1)
            n[k] = int(v) if v.lstrip("-").isdigit() else v
        with open(a[1], "w") as f:
            json.dump(n, f)
    elif cmd == "bench":  # runs.jsonl bench_dir numbers_file
        runs = [json.loads(l) for l in open(a[0])] if os.path.exists(a[0]) else []
        numbers = {}
        for p in sorted(glob.glob(os.path.join(a[1], "*.json"))):
            try:
                numbers[os.path.basename(p)[:-5]] = bench_numbers(p)
            except (OSError, ValueError, KeyError, TypeError) as e:
                numbers[os.path.basename(p)[:-5]] = {"unreadable": str(e)}
        with open(a[2], "w") as f:
            json.dump({"runs": runs, "results": numbers}, f)
    elif cmd == "passed":  # smoke_xml sanitizer_xml sanitizer_ok out numbers_file
        smoke, san, san_ok, out, nfile = a
        ids = re.compile(r"^test_op\[([A-Za-z0-9_]+)-([a-z]+)-([a-z0-9]+)\]$")
        got, sc = cases(smoke), cases(san)
        bad_stream = {n[len("test_streaming_equivalence[streaming-"):-1] for n, s in got.items()
                      if n.startswith("test_streaming_equivalence[") and s == "failed"}
        passed, dropped = [], {}
        for name, state in sorted(got.items()):
            m = ids.match(name)
            if not m or state != "passed":
                continue
            op, backend, dtype = m.groups()
            if backend not in ("cuda", "triton"):
                continue  # only GPU kernels are ever validated
            if backend in bad_stream:
                dropped[name] = f"the streaming equivalence failed on {backend}"
            elif backend == "cuda" and not (san_ok == "1" and sc.get(name) == "passed"):
                dropped[name] = "no clean compute-sanitizer run of this case"
            else:
                passed.append({"op": op, "backend": backend, "dtype": dtype})
        with open(out, "w") as f:
            json.dump(passed, f, indent=1)
        per = {}
        for e in passed:
            per[e["backend"]] = per.get(e["backend"], 0) + 1
        with open(nfile, "w") as f:
            json.dump({"entries": per, "not_recorded": dropped}, f)
        print(f"{len(passed)} entries ({per}); not recorded: {len(dropped)}")
        for k, v in dropped.items():
            print(f"  not recorded {k}: {v}")
    elif cmd == "summary":  # stages.jsonl summary.md
        lines = [json.loads(l) for l in open(a[0])] if os.path.exists(a[0]) else []
        def brief(s):
            n = s.get("numbers") or {}
            if s["stage"] == "a":
                keys = ("device", "arch_list", "torch", "triton", "nvcc", "build_s")
                return ", ".join(f"{k} {n[k]}" for k in keys if n.get(k) not in (None, ""))
            if s["stage"] in ("b", "c"):
                t = ", ".join(f"{n[k]} {k}" for k in ("passed", "failed", "skipped") if k in n)
                extra = [f"{k} {n[k]}" for k in ("sanitizer_exit", "sanitizer_errors") if k in n]
                return "; ".join([t] + extra)
            if s["stage"] == "d":
                return ", ".join(f"{r['name']} {r['status']} {r['seconds']}s" for r in n.get("runs", []))
            if s["stage"] == "e":
                return ", ".join(f"{k} {v}" for k, v in (n.get("entries") or {}).items()) or "no entries"
            return ""
        out = ["| stage | status | seconds | limit | key numbers | log |",
               "| --- | --- | ---: | ---: | --- | --- |"]
        for s in lines:
            note = f" ({s['note']})" if s.get("note") else ""
            out.append(f"| {s['stage']} {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} "
                       f"| {brief(s)}{note} | {s.get('log') or ''} |")
        text = "\n".join(out) + "\n"
        with open(a[1], "w") as f:
            f.write(text)
        print(text, end="")
    else:
        sys.exit(f"unknown helper command {cmd}")

main(*sys.argv[1:])
PYHELP
help_py() { "$PY" "$HELP" "$@"; }

# ----------------------------------------------------------------------------- stage machinery

want() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# tcmd LIMIT_S CMD...: CMD under `timeout`, at most LIMIT_S and at most what is left of the
# stage. SIGINT first (pytest then still writes its junit xml), SIGKILL 15 s later.
# Returns CMD's status, 124 (or 137) when it ran out of time.
tcmd() {
  local cap=$1 left
  shift
  left=$(( (STAGE_DEADLINE - $(now_ms)) / 1000 ))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 1 ]; then
    echo "(no time left in this stage for: $*)"
    return 124
  fi
  timeout -s INT -k 15 "$cap" "$@"
}

# Refresh the tarballs in $OUT (through a temporary name, so a cut leaves the last whole one).
pack() {
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs 2>/dev/null && mv -f "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  if [ -n "$(ls -A "$WORK/bench")" ]; then
    tar -czf "$OUT/bench.tar.gz.tmp" -C "$WORK/bench" . 2>/dev/null \
      && mv -f "$OUT/bench.tar.gz.tmp" "$OUT/bench.tar.gz"
  fi
}

FAILED=0
# stage ID NAME LIMIT_S FUNCTION: runs FUNCTION in this shell, its output both shown and kept in
# logs/stage_<id>.log; it returns 0 (ok), 124/137 (timeout), 200 (skipped) or anything else (fail)
# and may write its key numbers to $NUMBERS and a note to $NOTE.
stage() {
  local id=$1 name=$2 limit=$3 fn=$4 log rc status t_start secs left reserve=0
  log="logs/stage_$id.log"
  NUMBERS=$WORK/numbers_$id.json
  NOTE=""
  rm -f "$NUMBERS"
  if ! want "$id"; then
    help_py record "$OUT/stages.jsonl" "$id" "$name" skipped 0 "$limit" "" "" \
      "not selected (--stages $STAGES)" "$DRY_RUN"
    return
  fi
  [ "$id" != e ] && want e && reserve=$T_E
  left=$(( BUDGET - $(elapsed_s) - reserve ))
  [ "$limit" -gt "$left" ] && limit=$left
  echo
  echo "=== stage $id: $name (limit ${limit}s, $(date -u +%H:%M:%S))"
  if [ "$limit" -lt 5 ]; then
    help_py record "$OUT/stages.jsonl" "$id" "$name" skipped 0 "$limit" "" "" \
      "no time left in the run's budget of ${BUDGET}s" "$DRY_RUN"
    echo "skipped: no time left"
    return
  fi
  t_start=$(now_ms)
  STAGE_DEADLINE=$(( t_start + limit * 1000 ))
  "$fn" > >(tee "$WORK/$log") 2>&1
  rc=$?
  sleep 0.2  # let tee catch up before the stage's last line
  secs=$(( $(now_ms) - t_start ))
  secs=$(( secs / 1000 )).$(( (secs % 1000) / 100 ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    200) status=skipped ;;
    *) status=fail ;;
  esac
  case $status in fail|timeout) FAILED=1 ;; esac
  help_py record "$OUT/stages.jsonl" "$id" "$name" "$status" "$secs" "$limit" "$log" "$NUMBERS" \
    "$NOTE" "$DRY_RUN"
  echo "--- stage $id: $status in ${secs}s (log $log in logs.tar.gz)"
  pack
}

# ----------------------------------------------------------------------------- the stages

ARCH=""
stage_a() {
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else
    echo "(no nvidia-smi)"
  fi
  echo "== nvcc"
  local nvcc_v=""
  if command -v nvcc >/dev/null; then
    nvcc --version
    nvcc_v=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1)
  else
    echo "(no nvcc)"
  fi
  echo "== python"
  "$PY" - "$NUMBERS" "$nvcc_v" "$DRY_RUN" <<'PY' || return 1
import json, platform, sys
import torch
n = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "nvcc": sys.argv[2] or None, "cuda_available": torch.cuda.is_available()}
try:
    import triton
    n["triton"] = triton.__version__
except ImportError:
    n["triton"] = None
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    n["device"] = torch.cuda.get_device_name()
    n["capability"] = f"{major}.{minor}"
    # The arch-specific target ("a": wgmma, setmaxnreg) exists from sm_90 on.
    n["arch_list"] = f"{major}.{minor}" + ("a" if major >= 9 else "")
else:
    n["device"], n["arch_list"] = "cpu", None
print(json.dumps(n, indent=1))
with open(sys.argv[1], "w") as f:
    json.dump(n, f)
PY
  ARCH=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["arch_list"] or "")' "$NUMBERS")
  local b0 build_s=0
  if [ "$DRY_RUN" = 1 ]; then
    echo "== build: none in a dry run (the extension already built here is used)"
    NOTE="dry run: no build"
  elif [ -z "$ARCH" ]; then
    echo "no CUDA device: nothing to build for"
    return 1
  else
    echo "== build: TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$(nproc) VIDSTREAM_BUILD_CUDA=1 make build"
    # The stamp would skip pip when only the architecture changed; ninja rebuilds what it must.
    rm -f build/.ext-system
    b0=$(now_ms)
    tcmd 100000 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" VIDSTREAM_BUILD_CUDA=1 \
      make build PYTHON="$PY" VENV= || return $?
    build_s=$(( ($(now_ms) - b0) / 1000 ))
  fi
  echo "== import"
  "$PY" - "$NUMBERS" "$build_s" "$DRY_RUN" <<'PY' || return 1
import json, sys
import vidstream
from vidstream import _extension
n = json.load(open(sys.argv[1]))
n["build_s"] = int(sys.argv[2])
n["extension"] = bool(_extension.load())
n["cuda_kernels"] = bool(_extension.built_with_cuda())
n["backends"] = vidstream.backends()
print(json.dumps(n, indent=1))
with open(sys.argv[1], "w") as f:
    json.dump(n, f)
if sys.argv[3] != "1" and not n["cuda_kernels"]:
    sys.exit("vidstream._C has no CUDA kernels after the build")
PY
}

stage_b() {
  local xd=() sel=() rc
  if [ "$DRY_RUN" = 1 ]; then
    sel=(-k "$DRY_SMOKE_K")
  elif [ "${SMOKE_WORKERS:-8}" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    xd=(-n "${SMOKE_WORKERS:-8}")  # Triton compiles in parallel, one worker process each
  fi
  echo "VIDSTREAM_TEST_SEED=$SEED ${xd[*]+${xd[*]}} ${sel[*]+${sel[*]}}"
  tcmd 100000 env VIDSTREAM_TRITON_AUTOTUNE=first VIDSTREAM_TEST_SEED="$SEED" \
    "$PY" -m pytest tests/test_gpu_smoke.py -m gpu_smoke -q -rfEs -p no:cacheprovider \
    --junitxml="$LOGS/smoke.xml" ${xd[@]+"${xd[@]}"} ${sel[@]+"${sel[@]}"}
  rc=$?
  help_py junit "$LOGS/smoke.xml" "$NUMBERS" "pytest_exit=$rc" "seed=$SEED"
  [ "$DRY_RUN" = 1 ] && NOTE="dry run: CPU tensors, -k '$DRY_SMOKE_K'"
  return "$rc"
}

SANITIZER_OK=0
stage_c() {
  local rc errors
  if [ "$DRY_RUN" = 1 ]; then
    NOTE="dry run: no compute-sanitizer"
    echo "$NOTE"
    return 200
  fi
  if ! command -v compute-sanitizer >/dev/null; then
    NOTE="compute-sanitizer not found"
    echo "$NOTE"
    return 200
  fi
  if ! "$PY" -c "import sys, vidstream; sys.exit(not vidstream._extension.built_with_cuda())"; then
    NOTE="vidstream._C has no CUDA kernels (stage a)"
    echo "$NOTE"
    return 200
  fi
  # One small case per CUDA kernel and dtype: the cuda backend's smoke tests. Without the caching
  # allocator every buffer is its own allocation, so an access past a tensor's end is caught.
  # shellcheck disable=SC2086  # SANITIZER_ARGS: options, split on purpose
  tcmd 100000 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 VIDSTREAM_TEST_SEED="$SEED" \
    compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 ${SANITIZER_ARGS:-} \
    "$PY" -m pytest tests/test_gpu_smoke.py -m gpu_smoke -q -rfE -p no:cacheprovider \
    -k "cuda-" --junitxml="$LOGS/sanitizer.xml"
  rc=$?
  errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) error.*/\1/p' "$LOGS/stage_c.log" 2>/dev/null | tail -n 1)
  help_py junit "$LOGS/sanitizer.xml" "$NUMBERS" "sanitizer_exit=$rc" "sanitizer_errors=${errors:--1}"
  [ "$rc" = 0 ] && SANITIZER_OK=1
  return "$rc"
}

# bench NAME CAP_S CMD...: one benchmark, its status appended to bench_runs.jsonl.
BENCH_FAILED=0
bench() {
  local name=$1 cap=$2 t0 rc status secs
  shift 2
  echo
  echo "--- $name: $*"
  t0=$(now_ms)
  tcmd "$cap" "$@"
  rc=$?
  secs=$(( ($(now_ms) - t0) / 1000 ))
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=fail ;; esac
  # A failure outranks a timeout in the stage's status.
  case $status in
    fail) BENCH_FAILED=$rc ;;
    timeout) [ "$BENCH_FAILED" = 0 ] && BENCH_FAILED=$rc ;;
  esac
  printf '{"name": "%s", "status": "%s", "seconds": %s, "exit": %s}\n' "$name" "$status" "$secs" "$rc" \
    >> "$WORK/bench_runs.jsonl"
  pack
}

bench_skip() {
  printf '{"name": "%s", "status": "skipped", "seconds": 0, "note": "%s"}\n' "$1" "$2" \
    >> "$WORK/bench_runs.jsonl"
  echo "--- $1: skipped ($2)"
}

stage_d() {
  local dev=cuda size=--headline preset=wan-1.3b frames=12 autotune=${GPU_CHECK_AUTOTUNE:-first}
  if [ "$DRY_RUN" = 1 ]; then
    dev=cpu size=--tiny preset=tiny frames=6
    NOTE="dry run: --tiny shapes on the CPU, numbers mean nothing"
  else
    NOTE="Triton autotuning: $autotune"
  fi
  local J=$WORK/bench
  export VIDSTREAM_TRITON_AUTOTUNE=$autotune
  # Wan-1.3B cached attention (27,872-token context) and full chunk attention against SDPA,
  # FlexAttention and the torch backend.
  bench attention 75 "$PY" bench/bench_attention.py --device "$dev" "$size" --json "$J/"
  # rope3d_shift_ against the device-to-device copy bandwidth.
  bench rope 20 "$PY" bench/bench_rope3d.py --device "$dev" "$size" --json "$J/"
  bench select_blocks 20 "$PY" bench/bench_select_blocks.py --device "$dev" "$size" --json "$J/"
  bench lowrank 40 "$PY" bench/bench_lowrank.py --device "$dev" "$size" --json "$J/"
  # Positions as metadata: cached_attention with offsets against without and shift-then-attend;
  # the streaming loop with the re-rotating cache against the metadata one.
  bench offsets 30 "$PY" bench/bench_offsets.py --device "$dev" "$size" --json "$J/bench_offsets.json"
  # Forward + backward against SDPA with the same mask and FlexAttention.
  bench backward 40 "$PY" bench/bench_backward.py --device "$dev" "$size" --json "$J/"
  # End-to-end streaming, a few chunks after the runner's two-chunk warm-up: eager with the
  # PackForcing-like cache and with sink + window only; compiled with sink + window only, whose
  # cache layout repeats after a few chunks (with mid blocks every new layout is a new graph).
  bench stream 45 "$PY" bench/bench_stream.py --preset "$preset" --device "$dev" \
    --frames "${STREAM_FRAMES:-$frames}" --configs fused,no-mid --json "$J/bench_stream.json"
  if ! "$PY" bench/bench_stream.py --help 2>/dev/null | grep -q -- "--compile"; then
    bench_skip stream_compiled "bench_stream.py has no --compile flag yet"
  elif [ "$DRY_RUN" = 1 ] && [ "${DRY_COMPILE:-0}" != 1 ]; then
    bench_skip stream_compiled "dry run: compiling on this CPU takes minutes (DRY_COMPILE=1 runs it)"
  else
    bench stream_compiled 100000 "$PY" bench/bench_stream.py --preset "$preset" --device "$dev" \
      --frames "${STREAM_FRAMES:-$frames}" --configs "${STREAM_COMPILED_CONFIGS:-no-mid}" --compile \
      --json "$J/bench_stream_compiled.json"
  fi
  unset VIDSTREAM_TRITON_AUTOTUNE
  help_py bench "$WORK/bench_runs.jsonl" "$J" "$NUMBERS"
  return "$BENCH_FAILED"
}

stage_e() {
  local args
  if [ ! -s "$LOGS/smoke.xml" ]; then
    NOTE="stage b left no junit xml: nothing to record"
    echo "$NOTE"
    return 200
  fi
  if ! want c || [ "$DRY_RUN" = 1 ]; then
    echo "(no sanitizer run: no cuda entry is recorded)"
  fi
  help_py passed "$LOGS/smoke.xml" "$LOGS/sanitizer.xml" "$SANITIZER_OK" "$OUT/passed.json" "$NUMBERS" \
    || return 1
  if ! "$PY" -c "import vidstream.validation" 2>/dev/null; then
    NOTE="vidstream.validation is not there yet: passed.json kept, no record written"
    echo "$NOTE"
    return 200
  fi
  args=(record --passed "$OUT/passed.json" --out "$OUT/validated.json")
  if [ "$DRY_RUN" = 1 ]; then
    # An architecture no GPU has (the module takes sm_XY only): a dry-run record never
    # validates anything, even if it were copied over vidstream/validated.json.
    args+=(--command "bash bench/gpu_check.sh --dry-run" --arch "${DRY_ARCH:-sm_0}"
           --device-name "cpu (dry run)")
  else
    args+=(--command "bash bench/gpu_check.sh")
  fi
  echo "$PY -m vidstream.validation ${args[*]}"
  tcmd 100000 "$PY" -m vidstream.validation "${args[@]}"
}

echo "gpu_check: stages $STAGES$([ "$DRY_RUN" = 1 ] && echo ' (dry run)'), python $PY, OUT=$OUT," \
  "budget ${BUDGET}s, VIDSTREAM_TEST_SEED=$SEED"
stage a "environment and build" "$T_A" stage_a
stage b "smoke tests" "$T_B" stage_b
stage c "compute-sanitizer" "$T_C" stage_c
stage d "headline benchmarks" "$T_D" stage_d
stage e "validation record" "$T_E" stage_e

echo
echo "=== summary ($(elapsed_s)s in all; $OUT)"
help_py summary "$OUT/stages.jsonl" "$OUT/summary.md"
cp "$OUT/summary.md" "$LOGS/summary.md"
pack
if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
exit "$FAILED"
