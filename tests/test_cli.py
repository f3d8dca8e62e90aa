"""``vidstream demo``: the table, demo.json with the documented keys, demo.png."""

import json
import os
import subprocess
import sys

import pytest
import torch

from vidstream import cli

KEYS = {"frames", "fps", "fps_eager", "peak_memory_bytes", "cache_bytes", "max_abs_diff", "device",
        "preset", "backend"}


def test_demo_compare_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    n = torch.get_num_threads()
    try:
        cli.main(["demo", "--preset", "tiny", "--frames", "15", "--compare", "--device", "cpu",
                  "--out", str(tmp_path), "--mid-blocks", "2", "--top-k", "1"])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    for row in ("frames/s fused", "frames/s eager", "speed-up", "peak memory", "cache bytes",
                "max |fused - eager|"):
        assert row in out
    with open(tmp_path / "demo.json") as f:
        res = json.load(f)
    assert KEYS <= set(res)
    assert res["frames"] == 15 and res["preset"] == "tiny" and res["backend"] == "fused"
    assert res["fps"] > 0 and res["fps_eager"] > 0 and res["cache_bytes"] > 0
    assert res["max_abs_diff"] < 1e-4
    assert res["cache_bytes_per_chunk_eager"][-1] > res["cache_bytes_per_chunk_eager"][0]
    png = tmp_path / "demo.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-m", "vidstream", "demo", "--frames", "3", "--out", str(tmp_path),
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "demo.json") as f:
        res = json.load(f)
    assert res["fps_eager"] is None and res["max_abs_diff"] is None


def test_deprecated_backend_flag_is_an_alias_of_cache(tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        cli.main(["demo", "--frames", "3", "--backend", "reference", "--device", "cpu",
                  "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    assert "--backend reference is deprecated, use --cache naive" in capsys.readouterr().err
    with open(tmp_path / "demo.json") as f:
        assert json.load(f)["backend"] == "reference"
    with pytest.raises(SystemExit, match="contradicts"):
        cli.main(["demo", "--frames", "3", "--backend", "fused", "--cache", "naive"])
