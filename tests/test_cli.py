"""The ``vidstream`` command: ``demo`` (the table, demo.json with the documented keys, demo.png),
its failures (one line, status 2, before any work; Ctrl-C: status 130 and the partial result),
its progress display with and without tqdm, the matplotlib hint, ``--version`` and ``info``."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import vidstream
from vidstream import cli

KEYS = {"frames", "fps", "fps_eager", "peak_memory_bytes", "cache_bytes", "max_abs_diff", "device",
        "preset", "backend"}
ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _vidstream(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "vidstream", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout, **kwargs)


def test_demo_compare_writes_json_and_png(tmp_path, capsys, keep_threads):
    pytest.importorskip("matplotlib")
    assert cli.main(["demo", "--preset", "tiny", "--frames", "15", "--compare", "--device", "cpu",
                     "--out", str(tmp_path), "--mid-blocks", "2", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("frames/s fused", "frames/s eager", "speed-up", "peak memory", "cache bytes",
                "max |fused - eager|"):
        assert row in out
    with open(tmp_path / "demo.json") as f:
        res = json.load(f)
    assert KEYS <= set(res)
    assert res["frames"] == 15 and res["preset"] == "tiny" and res["backend"] == "fused"
    assert res["interrupted"] is False and res["frames_done"] == 15
    assert res["fps"] > 0 and res["fps_eager"] > 0 and res["cache_bytes"] > 0
    assert res["max_abs_diff"] < 1e-4
    assert res["cache_bytes_per_chunk_eager"][-1] > res["cache_bytes_per_chunk_eager"][0]
    png = tmp_path / "demo.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_entry_point(tmp_path):
    r = _vidstream("demo", "--frames", "3", "--out", str(tmp_path), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "demo.json") as f:
        res = json.load(f)
    assert res["fps_eager"] is None and res["max_abs_diff"] is None


def test_deprecated_backend_flag_is_an_alias_of_cache(tmp_path, capsys, keep_threads):
    cli.main(["demo", "--frames", "3", "--backend", "reference", "--device", "cpu",
              "--out", str(tmp_path)])
    assert "--backend reference is deprecated, use --cache naive" in capsys.readouterr().err
    with open(tmp_path / "demo.json") as f:
        assert json.load(f)["backend"] == "reference"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--frames", "3", "--backend", "fused", "--cache", "naive"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contradicts --cache naive" in err


# ----------------------------------------------------------------------------- failures


FAILURES = {
    "--device tpu": "--device must be cpu, cuda or cuda:N, got 'tpu'",
    "--device cuda:x": "--device must be cpu, cuda or cuda:N, got 'cuda:x'",
    "--chunk-frames 0": "--chunk-frames must be an int >= 1, got 0",
    "--sink-frames -2": "--sink-frames must be an int >= 0, got -2",
    "--recent-frames -1": "--recent-frames must be an int >= 0, got -1",
    "--timesteps 1000 -250": "--timesteps must be numbers in (0, 1000], got (1000, -250)",
    "--frames 0": "--frames must be an int >= 1, got 0",
    "--seed -1": "--seed must be an int >= 0, got -1",
    "--preset huge": "argument --preset: invalid choice: 'huge'",
    "--frames many": "argument --frames: invalid int value: 'many'",
    "--out /proc/nope": "--out /proc/nope: cannot write there",
}
if not torch.cuda.is_available():
    FAILURES["--device cuda"] = "--device cuda: this torch was built without CUDA" if (
        torch.version.cuda is None) else "--device cuda: no CUDA device is visible"


@pytest.mark.parametrize("flags", sorted(FAILURES))
def test_bad_arguments_fail_in_one_line_with_status_2_before_any_work(tmp_path, flags):
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags else []
    r = _vidstream("demo", "--frames", "3", "--device", "cpu", *out, *flags.split(), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1, r.stderr  # one line, no usage block, no traceback
    assert r.stderr.startswith("vidstream demo: error: ") and FAILURES[flags] in r.stderr
    assert r.stdout == ""  # the header comes after the model is built: nothing ran
    assert not (tmp_path / "out" / "demo.json").exists()


def test_usage_errors_in_process(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--chunk-frames", "0", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("vidstream demo: error: --chunk-frames must be an int >= 1, "
                                       "got 0\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["backends", "--device", "tpu"])
    assert e.value.code == 2 and "--device must be" in capsys.readouterr().err


def test_ctrl_c_stops_with_130_and_writes_the_partial_result(tmp_path):
    err_path = tmp_path / "stderr"
    out_dir = tmp_path / "out"
    with open(err_path, "w") as err:
        # SIGINT at its default in the child, whatever this process inherited (a background job
        # may ignore it), so Python turns it into KeyboardInterrupt.
        p = subprocess.Popen([sys.executable, "-m", "vidstream", "demo", "--frames", "1000000",
                              "--device", "cpu", "--out", str(out_dir)],
                             stdout=subprocess.PIPE, stderr=err, text=True, env=ENV,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while "fused" not in err_path.read_text() and time.monotonic() < deadline:
                assert p.poll() is None, err_path.read_text()
                time.sleep(0.2)
            time.sleep(2)  # some chunks done
            p.send_signal(signal.SIGINT)
            out, _ = p.communicate(timeout=120)
        finally:
            p.kill()
    err = err_path.read_text()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vidstream demo: interrupted at frame ") and "demo.json" in last
    with open(out_dir / "demo.json") as f:
        res = json.load(f)
    assert res["interrupted"] is True and res["frames"] == 1000000
    assert 0 <= res["frames_done"] < 1000000
    assert len(res["ms_per_chunk"]) == len(res["chunk_end_frames"])
    if res["frames_done"]:
        assert res["chunk_end_frames"][-1] == res["frames_done"] and res["fps"] > 0


# ----------------------------------------------------------------------------- progress, plots


def test_progress_is_on_stderr_with_one_rate(tmp_path, capsys, keep_threads):
    pytest.importorskip("tqdm")
    cli.main(["demo", "--frames", "6", "--device", "cpu", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert "frame/s" not in cap.out and "frames/s" not in cap.err
    final = cap.err.replace("\r", "\n").strip().splitlines()[-1]
    assert "6/6" in final and final.count("/s") == 1, final


def test_plain_counter_without_tqdm(tmp_path, capsys, monkeypatch, keep_threads):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    cli.main(["demo", "--frames", "6", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "fused: 6/6 frames, " in err and "frames/s, cache " in err


def test_hint_without_matplotlib_and_results_still_written(tmp_path, capsys, monkeypatch,
                                                           keep_threads):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["demo", "--frames", "3", "--device", "cpu", "--out", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    hints = [line for line in cap.err.splitlines() if "matplotlib" in line]
    assert hints == ["vidstream demo: matplotlib is not installed, so no demo.png (the JSON has "
                     "the same figures): pip install matplotlib"]
    assert (tmp_path / "demo.json").exists() and not (tmp_path / "demo.png").exists()
    assert "wrote " in cap.out


# ----------------------------------------------------------------------------- other commands


def test_help_shows_choices_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--preset {tiny,wan-1.3b,wan-14b}" in out and "(default: tiny)" in out
    assert "(default: 2000)" in out and "(default: [1000, 750, 500, 250])" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"vidstream {vidstream.__version__}\n"


def test_version_from_the_distribution_without_dunder_version(monkeypatch):
    monkeypatch.delattr(vidstream, "__version__")
    monkeypatch.setattr("importlib.metadata.version", lambda name: "9.9.9-" + name)
    assert cli.version() == "9.9.9-vidstream"


def test_info_prints_info_text(capsys, monkeypatch):
    stub = types.ModuleType("vidstream.info")
    stub.info_text = lambda: "vidstream 0.1.0\ntorch 2.x"
    monkeypatch.setitem(sys.modules, "vidstream.info", stub)
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out == "vidstream 0.1.0\ntorch 2.x\n"
