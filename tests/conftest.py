"""Shared test set-up. Without a GPU, Triton kernels run under the Triton interpreter, which must
be switched on before triton is first imported."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

import vidstream  # noqa: E402

# A new seed every run, so the kernels keep meeting inputs they have not seen; printed in the
# header, so a failure reproduces with VIDSTREAM_TEST_SEED=<seed>. Put in the environment here,
# before pytest-xdist starts its workers, so that every worker draws with the same seed.
SESSION_SEED = int(os.environ.setdefault("VIDSTREAM_TEST_SEED", str(random.randrange(2**31))))


def pytest_report_header(config):
    return (f"vidstream backends here: {vidstream.backends()}; torch {torch.__version__}; "
            f"VIDSTREAM_TEST_SEED={SESSION_SEED}")


@pytest.fixture(autouse=True)
def _seed():
    # Per test: the session seed and the test id (crc32, not hash(): Python salts str hashes per
    # process), so one test can be rerun alone with the same inputs.
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(test_id.encode()))


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"inputs drawn with VIDSTREAM_TEST_SEED={SESSION_SEED}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: intra-op threads only add synchronisation, and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
