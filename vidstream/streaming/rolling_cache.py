"""``RollingBufferCache``: the KV cache Self-Forcing and LongLive run, reproduced as the honest
baseline vidstream is timed against (docs/spec.md §6).

What their ``CausalWanSelfAttention.forward`` does with a ``kv_cache`` on every attention call,
and so what this class does (in its own plain-PyTorch code, SDPA in place of flash-attn):

* one fixed buffer per layer, ``k`` and ``v`` of ``[B, kv_cache_size, H, D]`` with
  ``kv_cache_size = local_attn_size * frame_tokens`` (here ``local_attn_size = sink_frames +
  recent_frames + chunk_frames``: LongLive's 3 + 6 + 3 = 12 with the demo's defaults), plus
  ``global_end_index`` / ``local_end_index`` kept as one-element tensors on the cache's device and
  read back with ``.item()`` (a host sync each) to decide where the chunk goes;
* RoPE applied to the current chunk's q and k on every pass, at the chunk's *absolute* first frame,
  in float64 complex arithmetic against a precomputed table of ``max_frames_rope`` rows (Wan's
  ``rope_params(1024, ...)``): keys are cached already rotated and never move in time again;
* when a new chunk does not fit, everything after the sink is rolled left by ``clone()``-and-copy
  (the sink's first ``sink_frames`` frames stay pinned), and the chunk is written at the end; the
  later denoising passes of the same chunk overwrite that slot, the t = 0 pass leaves its clean
  keys there;
* attention of the chunk's queries over ``k[:, max(0, local_end - max_attention_size):local_end]``
  with ``max_attention_size = kv_cache_size``: the sink, the last ``recent_frames`` frames and the
  chunk itself.

There is no compressed memory (``mid_blocks`` must be 0). Because positions are absolute, the
video stops where the table does: the chunk that would need temporal position
``max_frames_rope`` raises ``RopeTableExhausted`` (a ``RuntimeError``), where Self-Forcing crashes
on a shape mismatch in ``causal_rope_apply``. LongLive additionally clones the whole buffer on every
call before rolling it; that copy is left out, so this baseline is if anything faster than LongLive.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.rope_math import band_omega, rope_bands
from .config import CacheConfig, check_layer


class RopeTableExhausted(RuntimeError):
    """A chunk needs temporal RoPE positions beyond the table (Self-Forcing / LongLive crash)."""


def rope_table(rows: int, head_dim: int, theta: float, t_theta: Optional[torch.Tensor],
               device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wan's precomputed RoPE multipliers, complex128, one table per band: temporal
    ``[rows, Ht, c_t]`` (Ht = H with a per-head ``t_theta``, else 1), height and width
    ``[rows, c]``. Row p holds exp(i p omega) for the band's frequencies omega."""
    c_t, c_h, c_w = rope_bands(head_dim)
    pos = torch.arange(rows, dtype=torch.float64, device=device)
    om_t = band_omega(c_t, theta if t_theta is None else t_theta, device)
    om_t = om_t[None] if om_t.dim() == 1 else om_t          # [Ht, c_t]
    ang_t = pos[:, None, None] * om_t[None]
    ang_h = pos[:, None] * band_omega(c_h, theta, device)[None]
    ang_w = pos[:, None] * band_omega(c_w, theta, device)[None]
    return tuple(torch.polar(torch.ones_like(a), a) for a in (ang_t, ang_h, ang_w))


def apply_rope_f64(x: torch.Tensor, tables, grid, start_frame: int) -> torch.Tensor:
    """Rotates ``x`` [B, F*h*w, H, D] (frame-major) at temporal positions ``start_frame + f`` the
    way Wan's ``causal_rope_apply`` does: x as float64 complex pairs times the table rows, cast
    back to x's dtype."""
    t_tab, h_tab, w_tab = tables
    Fr, h, w = grid
    B, L, H, D = x.shape
    ft = t_tab[start_frame:start_frame + Fr]                 # [F, Ht, c_t]
    Ht = ft.shape[1]
    mult = torch.cat([
        ft.view(Fr, 1, 1, Ht, -1).expand(Fr, h, w, Ht, -1),
        h_tab[:h].view(1, h, 1, 1, -1).expand(Fr, h, w, Ht, -1),
        w_tab[:w].view(1, 1, w, 1, -1).expand(Fr, h, w, Ht, -1),
    ], dim=-1).reshape(L, Ht, D // 2)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(B, L, H, D // 2, 2))
    return torch.view_as_real(xc * mult).flatten(3).to(x.dtype)


class RollingBufferCache:
    """Self-Forcing / LongLive's rolling KV buffer behind the cache protocol of
    ``StreamingKVCache`` (module docstring): ``begin_chunk(F)``, ``attend(layer, q, k, v, grid)``
    once per layer per pass, ``end_chunk()``; ``nbytes`` is fixed at construction."""

    def __init__(self, *, num_layers: int, batch: int, kv_heads: int, head_dim: int, frame_shape,
                 config: CacheConfig, compressor=None, v_head_dim: int | None = None,
                 dtype=torch.float32, device="cpu", t_theta: torch.Tensor | None = None):
        if config.mid_blocks:
            raise ValueError(f"the rolling buffer (Self-Forcing / LongLive) keeps a sink and a "
                             f"window only: mid_blocks must be 0, got {config.mid_blocks}")
        self.cfg = config
        self.num_layers, self.batch = num_layers, batch
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.h, self.w = (int(s) for s in frame_shape)
        self.hw = self.h * self.w
        self.max_frames_rope = config.max_frames_rope
        self.local_attn_frames = config.sink_frames + config.recent_frames + config.chunk_frames
        self.kv_cache_size = self.local_attn_frames * self.hw
        self.max_attention_size = self.kv_cache_size
        self.sink_tokens = config.sink_frames * self.hw
        if max(self.h, self.w) > self.max_frames_rope:
            raise ValueError(f"frame_shape {(self.h, self.w)} needs more than max_frames_rope = "
                             f"{self.max_frames_rope} RoPE rows in height or width")
        dv = head_dim if v_head_dim is None else v_head_dim
        shape = (batch, self.kv_cache_size, kv_heads)
        self.k = [torch.zeros(*shape, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(*shape, dv, dtype=dtype, device=device) for _ in range(num_layers)]
        self.global_end_index = [torch.zeros(1, dtype=torch.long, device=device)
                                 for _ in range(num_layers)]
        self.local_end_index = [torch.zeros(1, dtype=torch.long, device=device)
                                for _ in range(num_layers)]
        self.tables = rope_table(self.max_frames_rope, head_dim, config.theta, t_theta, device)
        self.reset()

    def reset(self) -> None:
        for g, l in zip(self.global_end_index, self.local_end_index):
            g.zero_()
            l.zero_()
        self.frames_done = 0
        self.max_position = -1
        self._frames: Optional[int] = None   # frames of the chunk being generated

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V buffers: fixed at construction."""
        return sum(t.nbytes for t in self.k + self.v)

    def begin_chunk(self, frames: int) -> None:
        C = self.cfg.chunk_frames
        if self._frames is not None:
            raise RuntimeError("begin_chunk: the previous chunk was not ended (end_chunk)")
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= C:
            raise ValueError(f"frames must be an int in [1, chunk_frames = {C}], got {frames!r}")
        end = self.frames_done + frames
        if end > self.max_frames_rope:
            raise RopeTableExhausted(
                f"the rolling buffer's {self.max_frames_rope:,}-frame RoPE table is exhausted: "
                f"the chunk of frames [{self.frames_done}, {end}) needs absolute temporal positions "
                f"up to {end - 1} (Self-Forcing / LongLive stop here; vidstream's bounded cache "
                "keeps positions bounded)")
        self._frames = frames

    def attend(self, layer, q, k, v, grid) -> torch.Tensor:
        if self._frames is None:
            raise RuntimeError("attend: call begin_chunk first")
        check_layer(layer, self.num_layers)
        grid = tuple(int(g) for g in grid)
        if grid != (self._frames, self.h, self.w):
            raise ValueError(f"grid must be (frames of the chunk, h, w) = "
                             f"{(self._frames, self.h, self.w)}, got {grid}")
        start_frame = self.frames_done
        rq = apply_rope_f64(q, self.tables, grid, start_frame).type_as(v)
        rk = apply_rope_f64(k, self.tables, grid, start_frame).type_as(v)
        local_end = self._write(layer, rk, v, start_frame * self.hw)
        self.max_position = max(self.max_position, start_frame + grid[0] - 1)
        lo = max(0, local_end - self.max_attention_size)
        keys, values = self.k[layer][:, lo:local_end], self.v[layer][:, lo:local_end]
        out = F.scaled_dot_product_attention(rq.transpose(1, 2), keys.transpose(1, 2),
                                             values.transpose(1, 2))
        return out.transpose(1, 2)

    def _write(self, layer: int, rk: torch.Tensor, v: torch.Tensor, current_start: int) -> int:
        """Puts the chunk's rotated keys and values into the buffer where Self-Forcing does
        (rolling what follows the sink left when they do not fit); returns the new local end."""
        kb, vb = self.k[layer], self.v[layer]
        n_new = rk.shape[1]
        current_end = current_start + n_new
        # The index bookkeeping reads the device tensors back, one host sync each, as theirs does.
        global_end = self.global_end_index[layer].item()
        local_end = self.local_end_index[layer].item()
        if current_end > global_end and n_new + local_end > self.kv_cache_size:
            evicted = n_new + local_end - self.kv_cache_size
            rolled = local_end - evicted - self.sink_tokens
            s = self.sink_tokens
            # clone(): source and destination overlap.
            kb[:, s:s + rolled] = kb[:, s + evicted:s + evicted + rolled].clone()
            vb[:, s:s + rolled] = vb[:, s + evicted:s + evicted + rolled].clone()
            local_end = local_end + current_end - global_end - evicted
        else:
            local_end = local_end + current_end - global_end
        kb[:, local_end - n_new:local_end] = rk
        vb[:, local_end - n_new:local_end] = v
        self.global_end_index[layer].fill_(current_end)
        self.local_end_index[layer].fill_(local_end)
        return local_end

    def end_chunk(self) -> None:
        """The t = 0 pass already left the chunk's clean keys in the buffer: only the frame count
        moves on."""
        if self._frames is None:
            raise RuntimeError("end_chunk: no chunk was begun (begin_chunk)")
        self.frames_done += self._frames
        self._frames = None
