"""The ``torch`` backend (issue #11, item 1): every op composed of PyTorch's own ops, checked
against the float64 reference with the grids and the tolerance rule of every other backend, and
the default it becomes on CUDA tensors.

The grids are not copied: every test of the per-op files that is parametrized over
``"backend,device"`` (or ``"backend,device,strategy"``) is re-run here on ``torch`` for each
device, with its own grid. A re-run skips itself once its file lists ``torch`` itself
(``KERNEL_BACKENDS`` in tests/numerics.py, ``_strategies`` in tests/test_lowrank.py), so nothing
runs twice. The tests after the re-runs are the torch backend's own."""

from __future__ import annotations

import functools

import pytest
import test_attention
import test_compile
import test_host_sync
import test_lowrank
import test_rope3d
import test_rope3d_store
import test_select_blocks
import torch
from numerics import DTYPES, assert_close_to_oracle, devices, run

import vidstream
from vidstream import backend, reference, testing
from vidstream.ops import attention as attention_ops
from vidstream.ops import select_blocks as selection
from vidstream.ops.metadata import TokenRanges
from vidstream.streaming.model import StreamingDiT

# ----------------------------------------------------------------------------- the grids, on torch

_STRATEGIES = ("decompress", "absorb", None)


def _backends_of(mark) -> set:
    return {(p.values if hasattr(p, "values") else p)[0] for p in mark.args[1]}


def _lists_torch(fn) -> bool:
    """Whether ``fn`` is parametrized over a backend axis that already holds torch."""
    return any(m.name == "parametrize" and m.args[0].split(",")[0].strip() == "backend"
               and "torch" in _backends_of(m) for m in getattr(fn, "pytestmark", []))


def _on_torch(fn):
    """``fn`` re-parametrized: its backend axis replaced by ``torch`` on every device here, its
    other axes (the grid) kept. None when ``fn`` has no backend axis."""
    marks = getattr(fn, "pytestmark", [])
    axis = next((m for m in marks if m.name == "parametrize"
                 and m.args[0].replace(" ", "") in ("backend,device", "backend,device,strategy")), None)
    if axis is None:
        return None
    names = axis.args[0].replace(" ", "")
    rows = [("torch", d) for d in devices()]
    if names.endswith("strategy"):
        rows = [(*row, s) for row in rows for s in _STRATEGIES]
    values = [pytest.param(*row, id="-".join(map(str, row))) for row in rows]
    listed = _lists_torch(fn)

    @functools.wraps(fn)
    def rerun(*args, **kwargs):
        return fn(*args, **kwargs)

    rerun.pytestmark = [m for m in marks if m is not axis] + [
        pytest.mark.parametrize(names, values),
        pytest.mark.skipif(listed, reason="its own file runs it on the torch backend")]
    return rerun


for _module in (test_attention, test_rope3d, test_rope3d_store, test_select_blocks, test_lowrank):
    for _name, _fn in list(vars(_module).items()):
        if _name.startswith("test_") and callable(_fn):
            _test = _on_torch(_fn)
            if _test is not None:
                globals()[f"test_{_module.__name__[5:]}__{_name[5:]}"] = _test


_compile_listed = pytest.mark.skipif(
    _lists_torch(test_compile.test_public_op_compiles_fullgraph),
    reason="tests/test_compile.py runs it on the torch backend")


@_compile_listed
@pytest.mark.parametrize("op", test_compile.OPS)
def test_public_op_compiles_fullgraph(op):
    """Index arguments as tensors (values the tracer cannot read): the torch backend's
    value-free forms trace without a graph break and equal eager."""
    test_compile.test_public_op_compiles_fullgraph("torch", op)


@_compile_listed
def test_compiled_graph_still_refuses_bad_values():
    test_compile.test_compiled_graph_still_refuses_bad_values("torch")


def test_streaming_denoising_pass_compiles_whole():
    """The pass that CUDA graphs would capture traces on torch with no graph break."""
    whole = getattr(test_compile, "test_streaming_denoising_pass_compiles_whole", None)
    if whole is None:
        pytest.skip("tests/test_compile.py has no streaming-pass test")
    with vidstream.use_backend("torch"):
        whole()


@pytest.mark.parametrize("mid_blocks,top_k", [(0, None), (2, 1)])
def test_denoising_pass_is_host_sync_free(monkeypatch, mid_blocks, top_k):
    """What a CUDA tensor now gets by default keeps the bounded cache's pass free of host reads."""
    with vidstream.use_backend("torch"):
        test_host_sync.test_denoising_pass_is_host_sync_free(monkeypatch, mid_blocks, top_k)


def test_streaming_generation_equals_the_reference():
    model = StreamingDiT("tiny", seed=0).eval()
    text = torch.randn(1, model.config.text_len, model.config.text_dim)
    videos = {}
    for name in ("reference", "torch"):
        gen = vidstream.StreamingGenerator(model, chunk_frames=2, sink_frames=2, recent_frames=2,
                                           mid_blocks=2, top_k=1)
        with vidstream.use_backend(name):
            videos[name] = gen.generate(text, 10)
    torch.testing.assert_close(videos["torch"], videos["reference"], atol=1e-4, rtol=1e-4)


def test_every_test_file_grid_is_rerun():
    """Guards the collection above: the re-runs exist (an edit of the marks would drop them
    silently)."""
    names = [n for n in globals() if n.startswith("test_") and "__" in n]
    for module in ("attention", "rope3d", "rope3d_store", "select_blocks", "lowrank"):
        assert any(n.startswith(f"test_{module}__") for n in names), module
    assert "test_lowrank__attention" in names and "test_attention__chunk_attention_masks" in names


# ----------------------------------------------------------------------------- registry


def test_torch_backend_serves_every_op_on_every_device_and_dtype():
    for op in testing.ops():
        assert "torch" in testing.registered_backends(op), op
        for device in ("cpu", "cuda", "meta"):
            for dtype in (*DTYPES, torch.float64):
                assert backend.usable("torch", op, torch.device(device), dtype) is None
    assert "torch" in vidstream.backends("cpu")


def test_cuda_tensors_default_to_torch(monkeypatch):
    """No kernel is validated on a GPU: every op on CUDA tensors runs on torch, never on the
    reference; a validated kernel, once recorded, wins (cuda before triton)."""
    monkeypatch.setattr(backend, "usable", lambda name, op, device, dtype: None)

    class Cuda:
        device, dtype = torch.device("cuda"), torch.float32

    for op in testing.ops():
        validated = [n for n in ("cuda", "triton") if n in testing.registered_backends(op)
                     and testing.gpu_validated(op, n, Cuda.dtype)]
        assert vidstream.backend_for(op, Cuda) == (validated[0] if validated else "torch"), op
    recorded = set()  # what the record validates, in this test
    monkeypatch.setattr(backend, "validated", lambda op, name, dtype, arch: (op, name) in recorded)
    recorded.add(("cached_attention", "triton"))
    assert vidstream.backend_for("cached_attention", Cuda) == "triton"
    recorded.add(("cached_attention", "cuda"))
    assert vidstream.backend_for("cached_attention", Cuda) == "cuda"


def test_cpu_defaults_are_unchanged():
    x = torch.randn(1, 4, 2, 64)
    want = "cpu" if vidstream._extension.load() else "reference"
    for op in testing.ops():
        assert vidstream.backend_for(op, x) == want, op
        assert vidstream.backend_for(op, x.double()) == "reference", op
    with vidstream.use_backend("torch"):
        assert vidstream.backend_for("cached_attention", x.double()) == "torch"


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_without_lse(device, dtype):
    """The path without the log-sum-exp (SDPA itself on a GPU) meets the rule too."""
    q = torch.randn(2, 40, 4, 64, device=device).to(dtype)
    k = torch.randn(2, 40, 2, 64, device=device).to(dtype)
    v = torch.randn(2, 40, 2, 48, device=device).to(dtype)
    kw = dict(frame_tokens=4, chunk_frames=2, sink_frames=1, window_frames=4, scale=0.2)
    out = run("torch", vidstream.chunk_attention, q, k, v, **kw)
    oracle = reference.chunk_attention(q.double(), k.double(), v.double(), **kw)
    assert_close_to_oracle(out, oracle.to(out.device), reference.chunk_attention(q, k, v, **kw),
                           what="chunk out")
    ranges = [[30, 40], [0, 3], [11, 29]]
    out = run("torch", vidstream.cached_attention, q[:, :7], k, v, ranges)
    oracle = reference.cached_attention(q[:, :7].double(), k.double(), v.double(), ranges)
    assert_close_to_oracle(out, oracle.to(out.device),
                           reference.cached_attention(q[:, :7], k, v, ranges), what="cached out")


@pytest.mark.parametrize("device", devices())
def test_float64(device):
    """float64 runs on torch (the CPU flash kernel takes it; the eager form elsewhere) and
    agrees with the reference to float64 rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, h, 32, generator=g, dtype=torch.float64).to(device)
               for h in (4, 2, 2))
    ranges = [[16, 24], [0, 5]]
    kw = dict(frame_tokens=4, chunk_frames=2, sink_frames=1, window_frames=4)
    pairs = [
        (run("torch", vidstream.chunk_attention, q, k, v, **kw, return_lse=True),
         reference.chunk_attention(q, k, v, **kw, return_lse=True)),
        (run("torch", vidstream.cached_attention, q, k, v, ranges, return_lse=True),
         reference.cached_attention(q, k, v, ranges, return_lse=True)),
        (run("torch", vidstream.rope3d, q, grid=(2, 3, 4), frame_offset=7.5),
         reference.rope3d(q, grid=(2, 3, 4), frame_offset=7.5)),
        (run("torch", selection.block_scores, q, k, ranges, score="max"),
         reference.block_scores(q, k, ranges, score="max")),
    ]
    for got, want in pairs:
        for g_, w_ in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert g_.dtype == w_.dtype  # float64, and the lse float32
            tol = 1e-12 if g_.dtype == torch.float64 else 1e-6
            torch.testing.assert_close(g_, w_, rtol=tol, atol=tol)
    pool = k.clone()
    run("torch", vidstream.rope3d_shift_, pool, ranges, [3.0, -1.5])
    torch.testing.assert_close(pool, reference.rope3d_shift_(k.clone(), ranges, [3.0, -1.5]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices())
def test_nan_outside_the_keys_does_not_leak(device):
    """docs/spec.md NaN rule: only the keys a query attends are read."""
    q = torch.randn(1, 5, 4, 32, device=device)
    k_pool = torch.full((1, 30, 2, 32), float("nan"), device=device)
    v_pool = torch.full((1, 30, 2, 32), float("nan"), device=device)
    ranges = [[20, 26], [2, 9]]
    for s, e in ranges:
        k_pool[:, s:e], v_pool[:, s:e] = torch.randn(1, e - s, 2, 32), torch.randn(1, e - s, 2, 32)
    out, lse = run("torch", vidstream.cached_attention, q, k_pool, v_pool, ranges, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # chunk_attention: frame 1 (tokens 4-7) is in chunk 0, and outside the sink (frame 0) and
    # the two-frame window of every later chunk: its NaN reaches chunk 0 only.
    q, k, v = (torch.randn(1, 32, 4, 32, device=device) for _ in range(3))
    k[:, 4:8] = float("nan")
    out = run("torch", vidstream.chunk_attention, q, k, v, frame_tokens=4, chunk_frames=2,
              sink_frames=1, window_frames=2)
    assert torch.isnan(out[:, :8]).all() and torch.isfinite(out[:, 8:]).all()


@pytest.mark.parametrize("device", devices())
def test_non_finite_inputs_follow_ieee(device):
    """Where the fused kernels zero a row of non-finite scores (as if it were masked), the
    torch backend gives the NaN of docs/spec.md (tests/test_fuzz.py checks the full contract)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=g).to(device) for _ in range(3))
    k, v = k[:, :, :1].repeat(1, 3, 1, 1), v[:, :, :1].repeat(1, 3, 1, 1)  # 12 keys, one kv head
    q = q.abs() + 0.1  # positive queries: an Inf in a key's channel 0 scores with its sign

    def attend(q, k, v):
        return run("torch", vidstream.cached_attention, q, k, v, [[0, k.shape[1]]], return_lse=True)

    clean, clean_lse = attend(q, k, v)
    every = [(i, h) for i in range(4) for h in range(2)]
    cases = {  # poisoned tensor, where, value, the (query, head) rows expected NaN
        "nan-in-q": ("q", (0, 2, 1, 3), float("nan"), [(2, 1)]),
        "inf-in-q": ("q", (0, 1, 0, 0), float("-inf"), [(1, 0)]),
        "nan-in-a-key": ("k", (0, 5, 0, 2), float("nan"), every),
        "+inf-score": ("k", (0, 5, 0, 0), float("inf"), every),
        "every-key-scores-minus-inf": ("k", (0, slice(None), 0, 0), float("-inf"), every),
    }
    for name, (where, pos, val, rows) in cases.items():
        t = {"q": q, "k": k}[where].clone()
        t[pos] = val
        out, lse = attend(t, k, v) if where == "q" else attend(q, t, v)
        want = torch.zeros(4, 2, dtype=torch.bool)
        want[tuple(zip(*rows))] = True
        assert torch.equal(torch.isnan(out[0]).all(-1).cpu(), want), name
        assert torch.equal(~torch.isfinite(lse[0]).T.cpu(), want), name
        assert torch.equal(out[0][~want], clean[0][~want]), name
    # One key scoring -inf among finite ones drops out of the softmax.
    t = k.clone()
    t[0, 5, 0, 0] = float("-inf")
    out, lse = attend(q, t, v)
    keep = [j for j in range(12) if j != 5]
    want, want_lse = attend(q, k[:, keep], v[:, keep])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


def test_prepared_ranges_gather_with_an_index_built_once(monkeypatch):
    """A cache that reuses its prepared TokenRanges gathers through the index built on the first
    call: the host values are not read again."""
    reads = []
    host = TokenRanges._host
    monkeypatch.setattr(TokenRanges, "_host", lambda self: reads.append(1) or host(self))
    q, k, v = torch.randn(1, 6, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    prepared = TokenRanges.trusted([(30, 40), (3, 9), (12, 12)], "cpu")
    first = run("torch", vidstream.cached_attention, q, k, v, prepared)
    built = len(reads)
    assert built >= 1
    for _ in range(3):
        torch.testing.assert_close(run("torch", vidstream.cached_attention, q, k, v, prepared), first)
    assert len(reads) == built


def test_chunks_that_see_slid_spans_share_one_call(monkeypatch):
    """Once the window slides, consecutive full chunks attend the same spans shifted by a chunk:
    one SDPA call serves them all; the chunks before and the partial last chunk get their own."""
    calls = []
    sdpa = attention_ops.sdpa_attention
    monkeypatch.setattr(attention_ops, "sdpa_attention",
                        lambda q, *a: calls.append(q.shape[0]) or sdpa(q, *a))
    q, k, v = (torch.randn(1, 11 * 3, 2, 16) for _ in range(3))  # 11 frames: 5 full chunks + 1
    kw = dict(frame_tokens=3, chunk_frames=2, sink_frames=1, window_frames=4)
    out = run("torch", vidstream.chunk_attention, q, k, v, **kw)
    torch.testing.assert_close(out, reference.chunk_attention(q, k, v, **kw))
    # chunk 0 and 1: one span from token 0 each; chunks 2-4: sink + slid window, batched; chunk 5.
    assert calls == [1, 1, 3, 1]


def test_lowrank_tiled_is_cpu_only():
    q, c = torch.randn(1, 3, 2, 16), torch.randn(1, 20, 32)
    w_uk, w_uv = torch.randn(2, 32, 16), torch.randn(2, 32, 8)
    with pytest.raises(ValueError, match="tiled"):
        run("torch", vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, [[0, 9]],
            strategy="tiled")
