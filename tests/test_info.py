"""``vidstream.info.info_text()`` (what ``vidstream info`` prints), ``vidstream.__version__`` and the
debug log of backend choices (``logging.getLogger("vidstream")``)."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest
import torch

import vidstream
from vidstream import _extension, backend, info


def test_info_text_reports_versions_build_and_backends():
    text = info.info_text()
    assert f"vidstream:        {vidstream.__version__} (" in text
    assert f"torch:            {torch.__version__}" in text
    assert "vidstream._C:" in text and "CUDA:" in text and "Triton:" in text
    assert "GPU-validated:" in text
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        assert f"  {device} {dtype}:" in text
    for op in vidstream.default_backends("cpu", torch.float32):
        assert text.count(f"    {op} ") == 2, op  # one line per device
    if _extension.load():
        assert "vidstream._C:     loaded" in text
        if _extension.build_info() is not None:
            assert "-- the running torch" in text


def test_info_text_says_why_c_did_not_load(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_error", "the file is missing (test). Fix: rebuild it")
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch": "2.4.0", "python": "3.9.0"})
    text = info.info_text()
    assert "vidstream._C:     NOT loaded" in text
    assert "  why:            the file is missing (test). Fix: rebuild it" in text
    assert "torch 2.4.0 (CPU-only), Python 3.9.0 -- NOT the running torch" in text
    assert "the cpu backend cannot: vidstream._C is not built or failed to load" in text


def test_version_is_the_package_metadata():
    try:
        dist = importlib.metadata.version("vidstream")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vidstream is not installed (run from the tree on sys.path)")
    assert vidstream.__version__ == dist


def test_debug_log_names_each_backend_once(caplog, monkeypatch):
    monkeypatch.setattr(backend, "_logged", set())
    x = torch.randn(1, 4, 1, 8)
    with caplog.at_level(logging.INFO, logger="vidstream"):
        vidstream.rope3d(x, grid=(1, 2, 2))
    assert not caplog.records and not backend._logged  # nothing below debug level, nothing kept
    default = vidstream.backend_for("rope3d", x)
    with caplog.at_level(logging.DEBUG, logger="vidstream"):
        for _ in range(3):
            vidstream.rope3d(x, grid=(1, 2, 2))
            vidstream.rope3d(x.double(), grid=(1, 2, 2))
            with vidstream.use_backend("reference"):
                vidstream.rope3d(x, grid=(1, 2, 2))
    lines = [r.getMessage() for r in caplog.records if r.name == "vidstream"]
    assert lines.count(f"vidstream.rope3d on cpu float32 tensors runs on the {default} backend "
                       "(the default)") == 1, lines
    assert lines.count("vidstream.rope3d on cpu float64 tensors runs on the reference backend "
                       "(the default)") == 1, lines
    forced = ("vidstream.rope3d on cpu float32 tensors runs on the reference backend (forced by "
              "use_backend / VIDSTREAM_BACKEND)")
    assert lines.count(forced) == (1 if default != "reference" else 0), lines
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "vidstream")
