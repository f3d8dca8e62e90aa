"""``StreamingDiT``: a Wan2.1-shaped video diffusion transformer run chunk by chunk (docs/spec.md §6).

Patch embedding 1x2x2, per-frame AdaLN timestep modulation (Self-Forcing's causal Wan), q/k
RMSNorm, 3D RoPE and self-attention through a cache object, cross-attention to text tokens with a
cached text K/V, GELU-tanh FFN, head and unpatchify. Parameter names and shapes are those of
Wan2.1's ``WanModel`` state dict, so a Wan2.1 / Self-Forcing checkpoint loads with
``from_pretrained`` (and diffusers' ``WanTransformer3DModel`` with ``from_diffusers``; both in
``loading.py``).

Self-attention is delegated: each block calls ``attention.attend(layer, q, k, v, grid)`` with q and
k after RMSNorm and before RoPE. A ``StreamingKVCache`` / ``NaiveKVCache`` implements it for
streaming; ``FullSequenceAttention`` runs the whole video at once with ``chunk_attention``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    eps: float = 1e-6
    cross_attn_norm: bool = True
    latent_hw: tuple = (60, 104)   # latent height, width of one frame (832 x 480 video)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def frame_shape(self) -> tuple:
        """Token grid (h, w) of one latent frame after the 1x2x2 patch embedding."""
        return self.latent_hw[0] // 2, self.latent_hw[1] // 2


PRESETS = {
    # Small enough for CPU tests: 4 x 4 tokens a frame, 2 layers of 4 heads x 16.
    "tiny": DiTConfig(dim=64, num_heads=4, num_layers=2, ffn_dim=128, freq_dim=32, text_dim=32,
                      text_len=8, latent_hw=(8, 8)),
    # Wan2.1-T2V-1.3B (Self-Forcing's / LongLive's backbone) and Wan2.1-T2V-14B (wan/configs/), at
    # 832 x 480: VAE stride 8 -> 60 x 104 latents, patch (1, 2, 2) -> 30 x 52 = 1560 tokens a frame.
    "wan-1.3b": DiTConfig(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960),
    "wan-14b": DiTConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824),
}


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i / (dim/2)), formed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t.double()[:, None] * freqs[None]
    return torch.cat([angle.cos(), angle.sin()], dim=1).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """Computed in float32 whatever the activations' dtype, as Wan does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class Attention(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k over the full width (Wan's layout)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., num_heads, head_dim]."""
        return x.unflatten(-1, (self.num_heads, -1))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, grid, text_kv, attention,
                layer: int) -> torch.Tensor:
        """x [B, L, dim] float32 residual stream; e0 [B, F, 6, dim] per-frame modulation."""
        B, L, d = x.shape
        Fr = grid[0]
        dt = self.self_attn.q.weight.dtype
        mod = (self.modulation.float()[:, None] + e0).chunk(6, dim=2)  # each [B, F, 1, d]

        def modulate(y, shift, scale):
            return (y.view(B, Fr, -1, d) * (1 + scale) + shift).view(B, L, d).to(dt)

        sa = self.self_attn
        y = modulate(self.norm1(x), mod[0], mod[1])
        q = sa.heads(sa.norm_q(sa.q(y)))
        k = sa.heads(sa.norm_k(sa.k(y)))
        v = sa.heads(sa.v(y))
        y = sa.o(attention.attend(layer, q, k, v, grid).flatten(2))
        x = x + (y.float().view(B, Fr, -1, d) * mod[2]).view(B, L, d)
        ca = self.cross_attn
        cq = ca.heads(ca.norm_q(ca.q(self.norm3(x).to(dt))))
        tk, tv = text_kv
        c = F.scaled_dot_product_attention(cq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2))
        x = x + ca.o(c.transpose(1, 2).flatten(2)).float()
        y = self.ffn(modulate(self.norm2(x), mod[3], mod[4]))
        return x + (y.float().view(B, Fr, -1, d) * mod[5]).view(B, L, d)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * 4)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, grid) -> torch.Tensor:
        B, L, d = x.shape
        mod = (self.modulation.float()[:, None] + e[:, :, None]).chunk(2, dim=2)  # [B, F, 1, d]
        y = self.norm(x).view(B, grid[0], -1, d) * (1 + mod[1]) + mod[0]
        return self.head(y.view(B, L, d).to(self.head.weight.dtype))


class StreamingDiT(nn.Module):
    """Wan2.1-shaped DiT. ``StreamingDiT("tiny", seed=0)`` or ``StreamingDiT(DiTConfig(...))``;
    random weights are drawn from ``seed``."""

    def __init__(self, config: str | DiTConfig = "tiny", *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        super().__init__()
        cfg = PRESETS.get(config) if isinstance(config, str) else config
        if not isinstance(cfg, DiTConfig):
            raise ValueError(f"config must be a preset name {sorted(PRESETS)} or a DiTConfig, got {config!r}")
        if cfg.dim % cfg.num_heads or cfg.head_dim % 2:
            raise ValueError(f"dim ({cfg.dim}) must be a multiple of num_heads ({cfg.num_heads}) "
                             "with an even head dim")
        self.config = cfg
        d = cfg.dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=(1, 2, 2), stride=(1, 2, 2))
            self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                                nn.Linear(d, d))
            self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
            self.head = Head(cfg)
            self._init_weights()
        self.to(device=device, dtype=dtype)

    def _init_weights(self):
        # Wan's init, except that the head is not zeroed: random weights must give a signal.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.head.head.weight, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # -- text

    def text_kv(self, text: torch.Tensor) -> list:
        """Per layer the cross-attention K and V [B, text_len, H, Dh] of ``text`` [B, Lt,
        text_dim] with Lt <= text_len (zero-padded to ``text_len`` like Wan), computed once per
        video."""
        cfg = self.config
        if text.dim() != 3 or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text embeddings must be [B, Lt, text_dim={cfg.text_dim}], "
                             f"got {tuple(text.shape)}")
        if text.shape[1] > cfg.text_len:
            # Wan pads to text_len and fails on longer text; cutting it would drop the prompt's end.
            raise ValueError(f"text embeddings have {text.shape[1]} tokens, more than the model's "
                             f"text_len={cfg.text_len}")
        if text.shape[1] < cfg.text_len:
            text = F.pad(text, (0, 0, 0, cfg.text_len - text.shape[1]))
        ctx = self.text_embedding(text.to(self.device, self.dtype))
        out = []
        for blk in self.blocks:
            ca = blk.cross_attn
            out.append((ca.heads(ca.norm_k(ca.k(ctx))), ca.heads(ca.v(ctx))))
        return out

    # -- forward

    def forward(self, x: torch.Tensor, t, text_kv: list, attention) -> torch.Tensor:
        """Flow prediction for latents ``x`` [B, in_dim, F, H, W] at timesteps ``t`` (a number,
        [B] or per frame [B, F]); self-attention through ``attention`` (a cache or
        ``FullSequenceAttention``). Returns [B, out_dim, F, H, W] float32."""
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_dim or x.shape[3] % 2 or x.shape[4] % 2:
            raise ValueError(f"x must be [B, in_dim={cfg.in_dim}, F, H, W] with even H and W, "
                             f"got {tuple(x.shape)}")
        B, _, Fr, H, W = x.shape
        grid = (Fr, H // 2, W // 2)
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        t = t.reshape(-1, 1).expand(B, Fr) if t.dim() < 2 else t.expand(B, Fr)
        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t.reshape(-1)).to(self.dtype)).float()
        e0 = self.time_projection(e.to(self.dtype)).float().unflatten(1, (6, cfg.dim))
        e, e0 = e.view(B, Fr, cfg.dim), e0.view(B, Fr, 6, cfg.dim)
        h = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).float()
        for layer, blk in enumerate(self.blocks):
            h = blk(h, e0, grid, text_kv[layer], attention, layer)
        out = self.head(h, e, grid).float()
        return self.unpatchify(out, grid)

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """Head output [B, F*h*w, out_dim*4] -> latents [B, out_dim, F, 2h, 2w]."""
        Fr, h, w = grid
        c = self.config.out_dim
        x = x.view(x.shape[0], Fr, h, w, 1, 2, 2, c)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(x.shape[0], c, Fr, h * 2, w * 2)

    # -- checkpoints

    @classmethod
    def from_pretrained(cls, path: str, *, key: str | None = None, num_heads: int | None = None,
                        text_len: int | None = None, latent_hw: tuple[int, int] | None = None,
                        dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> StreamingDiT:
        """Loads a Wan2.1-T2V / Self-Forcing / LongLive checkpoint: a ``.safetensors`` file, a
        folder of them (``diffusion_pytorch_model*.safetensors`` with Wan's ``config.json``; a
        diffusers folder goes to ``from_diffusers``), or a torch file.

        ``key``: the entry of a checkpoint holding several state dicts. Self-Forcing / LongLive
        files hold ``generator`` and ``generator_ema``; the default (``None``) takes ``generator``,
        as their ``inference.py`` does without ``--use_ema`` (``key="generator_ema"`` for EMA),
        and a plain state dict as it is. Wrapper prefixes (``model.``, ``module.``,
        ``_fsdp_wrapped_module.``, ``_orig_mod.``) are stripped.

        Architecture: from the tensor shapes and every field of ``config.json`` (see
        ``vidstream.streaming.loading``); ``num_heads`` / ``text_len`` override it (a
        contradiction is an error); without either, heads come from the Wan preset of that width
        and ``text_len`` is Wan's 512. ``latent_hw`` (latent height, width of a frame) defaults
        to 60 x 104 (832 x 480 video). Image-to-video checkpoints are refused.

        ``.safetensors`` files are read with ``safetensors.safe_open`` (memory-mapped), each tensor
        cast to ``dtype`` as it is read (fp8 upcast), so a checkpoint is not held twice."""
        from . import loading

        if loading.folder_config(path).get("_class_name") == "WanTransformer3DModel":
            return cls.from_diffusers(path, text_len=text_len, latent_hw=latent_hw, dtype=dtype,
                                      device=device)
        state, meta = loading.load_files(path, key, dtype)
        state = loading.clean_keys(state)
        cfg = loading.wan_config(state, meta, num_heads=num_heads, text_len=text_len,
                                 latent_hw=latent_hw, where=repr(os.fspath(path)))
        return loading.build(cls, cfg, state, repr(os.fspath(path)), dtype, device)

    @classmethod
    def from_diffusers(cls, model_or_path, *, text_len: int | None = None,
                       latent_hw: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> StreamingDiT:
        """Converts diffusers' ``WanTransformer3DModel`` (an instance, or a folder with its
        ``config.json`` and safetensors, or a pipeline folder with ``transformer/``) into a
        ``StreamingDiT`` with the same weights. ``text_len`` defaults to 512, the length
        diffusers' Wan pipeline zero-pads prompts to (``max_sequence_length``); its transformer
        itself attends to whatever text it is given, so pass padded text to compare the two.
        Same one-chunk bidirectional forward as diffusers' (tests/test_diffusers.py); diffusers'
        per-token timesteps (Wan2.2 TI2V) and image branch are not supported."""
        from . import loading

        state, dcfg, where = loading.load_diffusers(model_or_path, dtype)
        cfg = loading.diffusers_config(dcfg, text_len=text_len, latent_hw=latent_hw)
        return loading.build(cls, cfg, loading.diffusers_to_wan(state), where, dtype, device)


def config_dict(cfg: DiTConfig) -> dict:
    d = asdict(cfg)
    d["head_dim"] = cfg.head_dim
    d["frame_tokens"] = math.prod(cfg.frame_shape)
    return d
