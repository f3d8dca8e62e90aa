"""Which GPU kernels have passed the test suite on a real GPU: the record ``vidstream/validated.json``.

An entry names an op, a backend (``triton`` or ``cuda``), a dtype and a GPU architecture, with the
sha256 of every source file that makes up that kernel. A kernel counts as validated only while the
sources that run match an entry, so any edit to a kernel, its helpers or its Python glue
un-validates it until ``bench/gpu_check.sh`` passes again on a GPU and records it (stage e runs
``python -m vidstream.validation record``). Triton and Python sources are hashed from the imported
package; CUDA sources are not shipped, so setup.py writes their hashes at build time to
``vidstream/_kernel_fingerprints.json`` (missing: no CUDA kernel counts as validated).

    python -m vidstream.validation record --passed PASSED.json --command "..." --out PATH \\
        [--arch sm_90] [--device-name NAME]
    python -m vidstream.validation show [--record PATH]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

from ._git import head_commit

PACKAGE = Path(__file__).resolve().parent
RECORD_PATH = PACKAGE / "validated.json"
KERNEL_FINGERPRINTS = PACKAGE / "_kernel_fingerprints.json"
RECORD_NAME = "vidstream/validated.json"  # how messages name the record
VERSION = 1
GPU_BACKENDS = ("cuda", "triton")
DTYPES = ("float16", "bfloat16", "float32")

# ----------------------------------------------------------------------------- which files

# The argument checks (ops/checks.py, ops/metadata.py) are left out: they run before every
# backend alike and the CPU suite covers them, so an edit there does not un-validate every kernel.
_TRITON_IEEE = ("triton_kernels/_ieee.py",)
_ROPE_GLUE = ("vidstream/ops/rope3d.py", "vidstream/ops/rope_math.py")
_ROPE_MATH = ("vidstream/ops/rope_math.py",)  # the offsets' angle tables (kv_deltas)
# The backward kernels count with the forward: a validated op serves gradients too.
_ATTENTION_TRITON = ("triton_kernels/attention.py", "triton_kernels/attention_backward.py",
                     *_TRITON_IEEE, "vidstream/ops/attention.py", *_ROPE_MATH)
_LOWRANK_TRITON = ("triton_kernels/lowrank.py", *_TRITON_IEEE, "vidstream/ops/lowrank.py",
                   *_ROPE_MATH)

# The quoted-include closure of each csrc/cuda binding and its csrc/kernels kernel
# (tests/test_validation.py checks it against the #include lines).
_CUDA_COMMON = ("csrc/cuda/binding_common.h", "csrc/cuda/check_launch.h", "csrc/kernels/convert.cuh",
                "csrc/kernels/elem_type.h", "csrc/kernels/launch.cuh", "csrc/ranges.h",
                "csrc/tensor_checks.h")
_CUDA_FAMILY = {
    "attention": ("csrc/cuda/attention.cpp", "csrc/kernels/attention.cu", "csrc/kernels/attention.h",
                  "csrc/kernels/ieee.cuh", "csrc/kernels/ranges.cuh", "csrc/attention_common.h",
                  "csrc/rope3d_common.h"),
    "lowrank": ("csrc/cuda/lowrank.cpp", "csrc/kernels/lowrank.cu", "csrc/kernels/lowrank.h",
                "csrc/kernels/ranges.cuh", "csrc/lowrank_common.h"),
    "rope3d": ("csrc/cuda/rope3d.cpp", "csrc/kernels/rope3d.cu", "csrc/kernels/rope3d.h",
               "csrc/kernels/ranges.cuh", "csrc/rope3d_common.h"),
    "rope3d_store": ("csrc/cuda/rope3d_store.cpp", "csrc/kernels/rope3d_store.cu",
                     "csrc/kernels/rope3d_store.h", "csrc/rope3d_common.h"),
    "select_blocks": ("csrc/cuda/select_blocks.cpp", "csrc/kernels/select_blocks.cu",
                      "csrc/kernels/select_blocks.h", "csrc/kernels/ieee.cuh",
                      "csrc/kernels/ranges.cuh", "csrc/select_common.h", "csrc/rope3d_common.h"),
}


def _cuda(*families: str, glue: tuple) -> tuple:
    return tuple(sorted({*_CUDA_COMMON, *(f for fam in families for f in _CUDA_FAMILY[fam]), *glue}))


# lowrank_cached_attention on triton/cuda may decompress and then call that backend's
# cached_attention, so the attention kernel is part of it.
SOURCES: dict[tuple[str, str], tuple[str, ...]] = {
    ("chunk_attention", "triton"): _ATTENTION_TRITON,
    ("cached_attention", "triton"): _ATTENTION_TRITON,
    ("lowrank_decompress", "triton"): _LOWRANK_TRITON,
    ("lowrank_cached_attention", "triton"): tuple(dict.fromkeys(_LOWRANK_TRITON + _ATTENTION_TRITON)),
    ("rope3d", "triton"): ("triton_kernels/rope3d.py", *_ROPE_GLUE),
    ("rope3d_shift_", "triton"): ("triton_kernels/rope3d.py", *_ROPE_GLUE),
    ("rope3d_store_", "triton"): ("triton_kernels/rope3d_store.py", "triton_kernels/rope3d.py",
                                  *_ROPE_GLUE),
    ("select_blocks", "triton"): ("triton_kernels/select_blocks.py", *_TRITON_IEEE,
                                  "vidstream/ops/select_blocks.py", *_ROPE_MATH),
    ("chunk_attention", "cuda"): _cuda("attention", glue=("vidstream/ops/attention.py",)),
    ("cached_attention", "cuda"): _cuda("attention", glue=("vidstream/ops/attention.py",)),
    ("lowrank_decompress", "cuda"): _cuda("lowrank", glue=("vidstream/ops/lowrank.py",)),
    ("lowrank_cached_attention", "cuda"): _cuda(
        "lowrank", "attention", glue=("vidstream/ops/lowrank.py", "vidstream/ops/attention.py")),
    ("rope3d", "cuda"): _cuda("rope3d", glue=_ROPE_GLUE),
    ("rope3d_shift_", "cuda"): _cuda("rope3d", glue=_ROPE_GLUE),
    ("rope3d_store_", "cuda"): _cuda("rope3d_store", glue=_ROPE_GLUE),
    ("select_blocks", "cuda"): _cuda("select_blocks", glue=("vidstream/ops/select_blocks.py",)),
}

# ----------------------------------------------------------------------------- fingerprints


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _triton_dir() -> Path:
    # setup.py installs the top-level triton_kernels/ as vidstream.triton_kernels.
    return Path(importlib.util.find_spec("vidstream.triton_kernels").submodule_search_locations[0])


def _built_csrc() -> dict:
    """The hashes setup.py wrote of the csrc files compiled into vidstream._C ({} if none)."""
    try:
        return json.loads(KERNEL_FINGERPRINTS.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}


def fingerprint(op: str, backend: str, *, root: str | Path | None = None) -> dict[str, str | None]:
    """sha256 of each source file of ``op`` on ``backend``, by logical path (None: not found).
    With ``root``, of the files under that source tree instead of what is running."""
    paths = SOURCES.get((op, backend))
    if paths is None:
        raise ValueError(f"no source table for {backend} {op}; known: {sorted(SOURCES)}")
    if root is not None:
        return {p: _sha256(Path(root) / p) for p in paths}
    csrc = _built_csrc() if any(p.startswith("csrc/") for p in paths) else {}
    triton_dir = _triton_dir() if any(p.startswith("triton_kernels/") for p in paths) else None
    out = {}
    for p in paths:
        if p.startswith("csrc/"):
            out[p] = csrc.get(p)
        elif p.startswith("triton_kernels/"):
            out[p] = _sha256(triton_dir / p.split("/", 1)[1])
        else:
            out[p] = _sha256(PACKAGE / p.split("/", 1)[1])
    return out


# ----------------------------------------------------------------------------- the record


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def arch_of(device: torch.device | str = "cuda") -> str | None:
    """``sm_<major><minor>`` of a CUDA device, None when it is not a CUDA device or none is here."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def load_record(path: str | Path | None = None) -> dict:
    """The record at ``path`` (default: the shipped one); a missing file is an empty record."""
    path = Path(path) if path is not None else RECORD_PATH
    if not path.exists():
        return {"version": VERSION, "entries": []}
    record = json.loads(path.read_text())
    if record.get("version") != VERSION or not isinstance(record.get("entries"), list):
        raise ValueError(f"{path}: not a version-{VERSION} record of validated kernels")
    return record


def _entries_for(record: dict, op: str, backend: str, dtype: str, arch: str) -> list[dict]:
    key = (op, backend, dtype, arch)
    return [e for e in record["entries"]
            if (e.get("op"), e.get("backend"), e.get("dtype"), e.get("arch")) == key]


def _changed(entry: dict, current: dict) -> list[str]:
    """The files whose hash differs from the entry's (added, removed or edited)."""
    return sorted(p for p in set(current) | set(entry.get("sources", {}))
                  if current.get(p) is None or entry.get("sources", {}).get(p) != current.get(p))


def matching_entry(op: str, backend: str, dtype, arch: str | None, *, record: dict | None = None,
                   root=None) -> dict | None:
    """The record's entry that validates ``op`` on ``backend`` for ``dtype`` on ``arch`` with the
    sources as they are now, or None."""
    if arch is None or (op, backend) not in SOURCES:
        return None
    record = load_record() if record is None else record
    entries = _entries_for(record, op, backend, dtype_name(dtype), arch)
    if not entries:
        return None
    current = fingerprint(op, backend, root=root)
    return next((e for e in entries if not _changed(e, current)), None)


def is_validated(op: str, backend: str, dtype, arch: str | None, *, record: dict | None = None,
                 root=None) -> bool:
    return matching_entry(op, backend, dtype, arch, record=record, root=root) is not None


def explain(op: str, backend: str, dtype, arch: str | None, *, record: dict | None = None,
            root=None) -> str:
    """Why ``backend``'s ``op`` is, or is not, validated for ``dtype`` on ``arch``, in words."""
    dtype = dtype_name(dtype)
    if arch is None:
        return "no CUDA device here, so no GPU architecture to match"
    if (op, backend) not in SOURCES:
        return f"{backend} has no {op} kernel to validate"
    record = load_record() if record is None else record
    entries = _entries_for(record, op, backend, dtype, arch)
    if not entries:
        return f"{RECORD_NAME} has no entry for {dtype} on {arch}"
    entry = matching_entry(op, backend, dtype, arch, record=record, root=root)
    if entry is not None:
        return f"validated on {entry.get('device')} at {entry.get('commit', '?')[:12]} ({entry.get('date')})"
    changed = _changed(entries[-1], fingerprint(op, backend, root=root))
    return (f"validated on {entries[-1].get('device')} at {entries[-1].get('commit', '?')[:12]}, but "
            f"changed since: {', '.join(changed)}")


# ----------------------------------------------------------------------------- command line


def _here(flag: str | None, found: str | None, what: str) -> str:
    """The GPU's own value when there is one (it wins over a flag), else the flag."""
    if found is None:
        if flag is None:
            raise SystemExit(f"no CUDA device here: pass --{what}")
        return flag
    if flag is not None and flag != found:
        print(f"--{what} {flag} ignored: this machine's GPU says {found}", file=sys.stderr)
    return found


def _passed_triples(path: str) -> list[tuple[str, str, str]]:
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list):
        raise SystemExit(f"{path}: expected a JSON list of {{op, backend, dtype}}")
    triples = []
    for item in items:
        triple = (item.get("op"), item.get("backend"), item.get("dtype"))
        if (triple[0], triple[1]) not in SOURCES or triple[2] not in DTYPES:
            raise SystemExit(f"{path}: {item} is not a GPU kernel (backends {GPU_BACKENDS}, "
                             f"dtypes {DTYPES}, ops with a source table)")
        triples.append(triple)
    return triples


def record_passed(passed: str, command: str, out: str, arch: str | None = None,
                  device_name: str | None = None) -> list[dict]:
    """Merge an entry per (op, backend, dtype) of ``passed`` into the record at ``out``, replacing
    older entries of the same op, backend, dtype and arch. Returns the new entries."""
    gpu = torch.cuda.is_available()
    arch = _here(arch, arch_of("cuda") if gpu else None, "arch")
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise SystemExit(f"--arch must look like sm_90, got {arch!r}")
    device_name = _here(device_name, torch.cuda.get_device_name() if gpu else None, "device-name")
    commit = head_commit() or "unknown"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    new = {}  # a triple listed twice is one entry
    for op, backend, dtype in _passed_triples(passed):
        sources = fingerprint(op, backend)
        missing = sorted(p for p, h in sources.items() if h is None)
        if missing:
            raise SystemExit(f"cannot record {backend} {op}: no fingerprint of {', '.join(missing)} "
                             "(for csrc files: was vidstream._C built with them?)")
        new[(op, backend, dtype, arch)] = {
            "op": op, "backend": backend, "dtype": dtype, "arch": arch, "sources": sources,
            "commit": commit, "date": date, "device": device_name, "command": command}
    kept = [e for e in load_record(out)["entries"]
            if (e.get("op"), e.get("backend"), e.get("dtype"), e.get("arch")) not in new]
    entries = sorted(kept + list(new.values()),
                     key=lambda e: (e["op"], e["backend"], e["dtype"], e["arch"]))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"version": VERSION, "entries": entries}, indent=2) + "\n")
    return list(new.values())


def show(path: str | None = None) -> str:
    """Each entry of the record and whether the sources running here still match it."""
    record = load_record(path)
    lines = [f"{path or RECORD_NAME}: {len(record['entries'])} entries"]
    for e in record["entries"]:
        key = (e.get("op"), e.get("backend"))
        if key not in SOURCES:
            state = "unknown op/backend"
        else:
            changed = _changed(e, fingerprint(*key))
            state = "matches" if not changed else f"STALE ({', '.join(changed)} changed)"
        lines.append(f"  {e.get('op')} {e.get('backend')} {e.get('dtype')} {e.get('arch')}: {state}; "
                     f"{e.get('device')} at {str(e.get('commit'))[:12]} on {e.get('date')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidstream.validation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="record kernels that passed on this GPU")
    r.add_argument("--passed", required=True, help='JSON list of {"op", "backend", "dtype"}')
    r.add_argument("--command", required=True, dest="run_command", help="the command that validated")
    r.add_argument("--out", required=True, help="the record to create or merge into")
    r.add_argument("--arch", help="sm_XY, when no CUDA device is here (a dry run)")
    r.add_argument("--device-name", help="the GPU's name, when no CUDA device is here")
    s = sub.add_parser("show", help="print the record and whether each entry still matches")
    s.add_argument("--record", default=None, help=f"default: {RECORD_NAME}")
    args = p.parse_args(argv)
    if args.command == "record":
        new = record_passed(args.passed, args.run_command, args.out, args.arch, args.device_name)
        print(f"{args.out}: recorded {len(new)} entries")
    else:
        print(show(args.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
