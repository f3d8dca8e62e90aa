"""Shared test set-up. Without a GPU, Triton kernels run under the Triton interpreter, which must
be switched on before triton is first imported."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import vidstream  # noqa: E402


def pytest_report_header(config):
    return f"vidstream backends here: {vidstream.backends()}; torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    # Fresh inputs for every test, yet reproducible from the test id when one fails.
    # crc32, not hash(): str hashes are salted per process, so the seed would not be reproducible.
    torch.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
