"""Every ```python block of README.md runs as written: each in a fresh interpreter (its own
imports, nothing shared), on the CPU, from a scratch directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vidstream

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3  # the API, prepared ranges, the backend choice


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_as_written(code, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if "use_backend(\"triton\")" in code and not torch.cuda.is_available():
        pytest.importorskip("triton")
        env["TRITON_INTERPRET"] = "1"  # the block says so: Triton's interpreter on a CPU
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"README block failed:\n{code}\n{r.stderr[-3000:]}"


# ----------------------------------------------------------------------------- LowRankKV's rule
# The README converts nn.Linear projections; the rule behind it, checked exactly.


def test_from_dense_takes_nn_linear_modules_and_their_weights():
    H, D, dim = 4, 16, 40
    torch.manual_seed(0)
    proj_k, proj_v = torch.nn.Linear(dim, H * D).double(), torch.nn.Linear(dim, H * D).double()
    full = dim + 1  # the rank bound with a bias column: exact
    from_modules = vidstream.LowRankKV.from_dense(proj_k, proj_v, full, 4, heads=H)
    from_weights = vidstream.LowRankKV.from_dense(proj_k.weight, proj_v.weight, full, 4, heads=H,
                                                  b_k=proj_k.bias, b_v=proj_v.bias)
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    with torch.no_grad():
        k_dense, v_dense = proj_k(x).unflatten(-1, (H, D)), proj_v(x).unflatten(-1, (H, D))
        for m in (from_modules, from_weights):
            k, v = m.decompress(*m(x))
            torch.testing.assert_close(v, v_dense)
            torch.testing.assert_close(k[..., :D - 4], k_dense[..., :D - 4])  # the latent part
    for a, b in zip(from_modules.parameters(), from_weights.parameters()):
        assert torch.equal(a, b)


def test_from_dense_messages_say_what_to_pass():
    w = torch.randn(64, 40)
    with pytest.raises(ValueError, match=r"pass heads=H to split its rows into H heads"):
        vidstream.LowRankKV.from_dense(w, w, 8, 4)
    with pytest.raises(ValueError, match=r"look like \[dim, H\*D\].*pass w_k.T and w_v.T"):
        vidstream.LowRankKV.from_dense(torch.randn(40, 64), torch.randn(40, 64), 8, 4, heads=16)
    with pytest.raises(ValueError, match="b_k must be None when w_k is an nn.Linear"):
        vidstream.LowRankKV.from_dense(torch.nn.Linear(40, 64), torch.nn.Linear(40, 64), 8, 4,
                                       heads=4, b_k=torch.zeros(64))
