"""bench/gpu_check.sh, the staged GPU check, in its --dry-run form: the same stage machinery on CPU
tensors (no build, no sanitizer, the smoke tests that run here, --tiny benchmarks, a validation
record for an architecture no GPU has), so the script a lent GPU runs is known to work before
the GPU is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["a", "b", "c", "d", "e"]


def _run(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _stages(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return out, _run(out, "--dry-run")


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_every_stage_and_none_failed(dry_run):
    out, proc = dry_run
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    stages = _stages(out)
    assert [s["stage"] for s in stages] == STAGES, log
    for s in stages:
        assert s["status"] in ("ok", "skipped"), f"stage {s['stage']}: {s}\n{log}"
        assert s["dry_run"] is True and s["seconds"] <= s["limit_s"] + 20
    by = {s["stage"]: s for s in stages}
    assert by["a"]["status"] == by["b"]["status"] == by["d"]["status"] == "ok", log
    assert by["c"]["status"] == "skipped"  # no compute-sanitizer in a dry run
    assert by["b"]["numbers"]["passed"] > 0 and by["b"]["numbers"]["failed"] == 0
    runs = {r["name"]: r["status"] for r in by["d"]["numbers"]["runs"]}
    assert {"attention", "rope", "select_blocks", "lowrank", "stream"} <= set(runs)
    assert all(v in ("ok", "skipped") for v in runs.values()), runs
    summary = (out / "summary.md").read_text()
    for s in stages:
        assert f"| {s['stage']} {s['name']} | {s['status']} |" in summary


def test_dry_run_outputs(dry_run):
    out, proc = dry_run
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files  # what the device tool returns from $OUT
    assert {"stages.jsonl", "summary.md", "logs.tar.gz", "bench.tar.gz", "passed.json"} <= set(files)
    passed = json.loads((out / "passed.json").read_text())
    assert passed and all(set(e) == {"op", "backend", "dtype"} for e in passed)
    assert all(e["backend"] in ("cuda", "triton") for e in passed)
    e = _stages(out)[-1]
    if e["status"] == "ok":  # vidstream.validation wrote the record, for no real GPU
        record = json.loads((out / "validated.json").read_text())
        assert {x["arch"] for x in record["entries"]} == {"sm_0"}
        assert {(x["op"], x["backend"], x["dtype"]) for x in record["entries"]} == {
            (x["op"], x["backend"], x["dtype"]) for x in passed}


def test_stages_option(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--stages", "c", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = _stages(tmp_path)
    assert [s["stage"] for s in stages] == STAGES
    assert all(s["status"] == "skipped" for s in stages)
    assert [s["stage"] for s in stages if "not selected" in (s["note"] or "")] == ["a", "b", "d", "e"]
    bad = _run(tmp_path, "--stages", "a,x", timeout=60)
    assert bad.returncode == 2 and "--stages" in bad.stderr
