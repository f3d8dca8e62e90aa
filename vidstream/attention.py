"""Public chunk-causal attention ops (SPEC §1, §2) and their backends: ``reference`` (eager,
with a mask), ``cpu`` (C++ tiled online softmax), ``triton`` and ``cuda`` (opt-in until validated
on a GPU). The C++ ops always return ``(out, lse)``; the wrappers drop ``lse`` when unasked."""

from __future__ import annotations

import torch

from . import _extension, _validate, backend, reference


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, frame_tokens: int,
                    chunk_frames: int, sink_frames: int = 0, window_frames: int | None = None,
                    scale: float | None = None, return_lse: bool = False):
    """Full-sequence chunk-causal sink + window attention (SPEC §1). ``q`` [B, L, H, D],
    ``k`` [B, L, H_kv, D], ``v`` [B, L, H_kv, Dv]; returns ``out`` [B, L, H, Dv] and, with
    ``return_lse``, the float32 log-sum-exp [B, H, L]."""
    _validate.chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames)
    scale = _validate.scale_value(scale, q.shape[3])
    return backend.resolve("chunk_attention", q)(
        q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale, return_lse)


def cached_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, kv_ranges, *,
                     scale: float | None = None, return_lse: bool = False):
    """One chunk's queries ``q`` [B, Lq, H, D] against the union of the token ranges
    ``kv_ranges`` [R, 2] of a pool ``k_pool`` [B, P, H_kv, D], ``v_pool`` [B, P, H_kv, Dv]
    (SPEC §2). An empty union gives zeros and ``lse = -inf``."""
    host = _validate.cached_attention(q, k_pool, v_pool, kv_ranges)
    scale = _validate.scale_value(scale, q.shape[3])
    return backend.resolve("cached_attention", q)(q, k_pool, v_pool, host, scale, return_lse)


def _pick(out, lse, return_lse):
    return (out, lse) if return_lse else out


def _chunk_attention_native(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                            return_lse):
    out, lse = torch.ops.vidstream.chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames,
                                                   window_frames, float(scale))
    return _pick(out, lse, return_lse)


def _cached_attention_native(q, k_pool, v_pool, ranges, scale, return_lse):
    out, lse = torch.ops.vidstream.cached_attention(q, k_pool, v_pool, ranges, float(scale))
    return _pick(out, lse, return_lse)


def _chunk_attention_triton(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                            return_lse):
    from .triton_kernels import attention as kernels

    out, lse = kernels.chunk_attention_triton(q, k, v, frame_tokens, chunk_frames, sink_frames,
                                              window_frames, float(scale))
    return _pick(out, lse, return_lse)


def _cached_attention_triton(q, k_pool, v_pool, ranges, scale, return_lse):
    from .triton_kernels import attention as kernels

    out, lse = kernels.cached_attention_triton(q, k_pool, v_pool, ranges.to(q.device, torch.int32),
                                               float(scale))
    return _pick(out, lse, return_lse)


def _attention_outputs(q, v):
    B, L, H, _ = q.shape
    return q.new_empty(B, L, H, v.shape[3]), q.new_empty(B, H, L, dtype=torch.float32)


@_extension.register_fake("chunk_attention")
def _chunk_attention_fake(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale):
    return _attention_outputs(q, v)


@_extension.register_fake("cached_attention")
def _cached_attention_fake(q, k_pool, v_pool, kv_ranges, scale):
    return _attention_outputs(q, v_pool)


backend.register("chunk_attention", "reference", reference._chunk_attention)
backend.register("cached_attention", "reference", reference._cached_attention)
backend.register("chunk_attention", "cpu", _chunk_attention_native)
backend.register("cached_attention", "cpu", _cached_attention_native)
# Not yet run on a GPU: opt-in on CUDA tensors (vidstream.use_backend) until bench/gpu_check.sh passes.
backend.register("chunk_attention", "triton", _chunk_attention_triton, gpu_validated=False)
backend.register("cached_attention", "triton", _cached_attention_triton, gpu_validated=False)
# Hand-written mma.sync kernels (csrc/kernels/attention.cu): float16/bfloat16, head dims 64/128.
backend.register("chunk_attention", "cuda", _chunk_attention_native, gpu_validated=False)
backend.register("cached_attention", "cuda", _cached_attention_native, gpu_validated=False)
