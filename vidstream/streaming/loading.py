"""Checkpoints into ``StreamingDiT`` (docs/spec.md §6): Wan2.1 / Self-Forcing / LongLive files and
folders, and diffusers' ``WanTransformer3DModel`` (a module or a saved folder).

Only the Wan2.1 text-to-video DiT is supported: image-to-video / first-last-frame / VACE
checkpoints (``k_img``, ``img_emb``, ``vace_blocks`` or diffusers' ``add_k_proj`` /
``image_embedder``) are refused with a ``ValueError`` rather than loaded without their image branch.

Wan2.1 ``config.json`` fields (``WanModel.__init__``) and what is done with them:

- ``model_type``, ``patch_size``, ``window_size``, ``qk_norm``: must be Wan2.1-T2V's ``"t2v"``,
  ``(1, 2, 2)``, ``(-1, -1)``, ``True``;
- ``dim``, ``ffn_dim``, ``freq_dim``, ``text_dim``, ``in_dim``, ``out_dim``, ``num_layers``,
  ``cross_attn_norm``: checked against the tensor shapes;
- ``num_heads``, ``text_len`` (the zero-padded text length), ``eps``: taken.

Wan's own ``config.json`` omits ``patch_size``, ``cross_attn_norm``, ``qk_norm``, ``text_dim`` and
``window_size`` (``WanModel.ignore_for_config``): absent fields take ``WanModel``'s defaults, the
shapes fill in the rest.
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch

from ..ops import checks
from .model import PRESETS, DiTConfig

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                         "float8_e5m2fnuz") if hasattr(torch, n))
# Wrapper names torch.compile / DDP / FSDP / activation checkpointing insert anywhere in a key.
_INNER_WRAPPERS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Leading names of the module that held the DiT (Self-Forcing's WanDiffusionWrapper.model, DDP).
_OUTER_PREFIXES = ("module.", "model.", "generator.")
_I2V_MARKERS = ("k_img", "v_img", "img_emb", "vace_", "add_k_proj", "add_v_proj", "image_embedder")

WAN_DEFAULTS = {  # WanModel.__init__'s defaults (Wan2.1 wan/modules/model.py)
    "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16, "dim": 2048,
    "ffn_dim": 8192, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 16,
    "num_layers": 32, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
    "eps": 1e-6,
}
WAN_LATENT_HW = (60, 104)  # 832 x 480 video through the VAE's spatial stride 8


# ----------------------------------------------------------------------------- reading files


def read_safetensors(path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, memory-mapped by the ``safetensors`` package; floating tensors in
    ``dtype`` (fp8 upcast), cast one at a time so a checkpoint is never held twice."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(f"reading {path!r} needs the safetensors package: pip install "
                          "safetensors") from None
    out = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            out[name] = _cast(f.get_tensor(name), dtype)
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.is_floating_point() or t.dtype in _FP8:
        return t.to(dtype)
    return t


def _read_torch(path: str):
    try:  # zip-format files map lazily; the legacy format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state(obj, key: str | None, path: str) -> dict:
    """The state dict inside a checkpoint object. ``key``: the entry to take ("generator",
    "generator_ema", "model", ...); ``None``: a plain state dict as it is, else Self-Forcing's
    ``generator`` (what its ``inference.py`` loads without ``--use_ema``), else ``state_dict`` /
    ``model``. Flat files whose keys start with ``generator.`` / ``generator_ema.`` count as
    holding both entries."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    groups = _entries(obj)
    if key is not None:
        if not isinstance(key, str):
            checks.fail_type(f"key must be None or a str naming an entry of the checkpoint, got {key!r}")
        if key not in groups:
            raise ValueError(f"key={key!r}: {path!r} has no state dict under {key!r}; its entries "
                             f"are {sorted(groups) or 'none (a plain state dict: pass key=None)'}")
        return groups[key]
    if "generator" in groups:
        return groups["generator"]
    if "generator_ema" in groups:
        raise ValueError(f"{path!r} holds only 'generator_ema': pass key='generator_ema' to load it")
    if _is_state_dict(obj):
        return obj
    for name in ("state_dict", "model"):
        if name in groups:
            return groups[name]
    raise ValueError(f"no state dict found in {path!r}: its entries are {sorted(obj)[:8]}; pass "
                     "key= naming the one to load")


def _entries(obj: dict) -> dict:
    """Named state dicts of a checkpoint: nested dicts, or key-prefix groups of a flat file."""
    groups = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, dict)}
    if _is_state_dict(obj):
        for name in ("generator", "generator_ema"):
            sub = {k[len(name) + 1:]: v for k, v in obj.items() if k.startswith(name + ".")}
            if sub:
                groups[name] = sub
    return groups


def clean_keys(state: dict) -> dict:
    """Wan key names: wrapper prefixes removed, RoPE's ``freqs`` buffer dropped."""
    clean = {}
    for k, v in state.items():
        for w in _INNER_WRAPPERS:
            k = k.replace(w, "")
        while k.startswith(_OUTER_PREFIXES):
            k = k.split(".", 1)[1]
        clean[k] = v
    clean.pop("freqs", None)
    return clean


def refuse_image_models(state: dict, where: str) -> None:
    bad = sorted(k for k in state if any(m in k for m in _I2V_MARKERS))
    if bad:
        raise ValueError(f"{where} is an image-to-video (or VACE) Wan checkpoint ({bad[0]!r}, ...): "
                         "not supported, only the text-to-video DiT is")


def load_files(path: str, key: str | None, dtype: torch.dtype) -> tuple[dict, dict]:
    """(state dict in ``dtype``, names as stored; config.json contents or {}) of a file or folder."""
    if not isinstance(path, (str, os.PathLike)):
        checks.fail_type(f"path must be a file or folder path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"path {path!r} does not exist")
    meta = folder_config(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"no .safetensors files in {path!r}")
    else:
        files = [path]
    state = {}
    for fn in files:
        if fn.endswith(".safetensors"):
            state.update(read_safetensors(fn, dtype))
        else:
            state.update(select_state(_read_torch(fn), key, fn))
    # Flat safetensors may hold "generator." / "generator_ema." groups: pick one like a torch file.
    flat = any(fn.endswith(".safetensors") for fn in files)
    if flat and (key is not None or _entries(state)):
        state = select_state(state, key, path)
    state = {k: _cast(v, dtype) for k, v in state.items()}
    return state, meta


# ----------------------------------------------------------------------------- Wan2.1 config


def _shape_fields(state: dict) -> dict:
    try:
        pe = state["patch_embedding.weight"]
        fields = {
            "dim": pe.shape[0], "in_dim": pe.shape[1], "patch_size": tuple(pe.shape[2:]),
            "num_layers": 1 + max(int(m.group(1)) for k in state
                                  if (m := re.match(r"blocks\.(\d+)\.", k))),
            "ffn_dim": state["blocks.0.ffn.0.weight"].shape[0],
            "freq_dim": state["time_embedding.0.weight"].shape[1],
            "text_dim": state["text_embedding.0.weight"].shape[1],
            "out_dim": state["head.head.weight"].shape[0] // 4,
        }
    except (KeyError, ValueError) as e:
        if any(k.startswith("condition_embedder.") for k in state):
            raise ValueError("these are diffusers WanTransformer3DModel weights: load their folder "
                             "(with diffusers' config.json) with StreamingDiT.from_diffusers") from None
        raise ValueError(f"not a Wan2.1 state dict (missing {e})") from None
    fields["cross_attn_norm"] = "blocks.0.norm3.weight" in state
    return fields


def wan_config(state: dict, meta: dict, *, num_heads=None, text_len=None, latent_hw=None,
               where: str = "checkpoint") -> DiTConfig:
    """The ``DiTConfig`` of a Wan2.1 state dict and its ``config.json`` contents ``meta``.
    Arguments given here override the file; a field the file and the shapes disagree on is an
    error. Heads: ``num_heads``, else ``config.json``, else the Wan preset of that width (1536:
    12, 5120: 40), else an error (it cannot be read from the shapes)."""
    refuse_image_models(state, where)
    shapes = _shape_fields(state)
    for name in ("model_type", "patch_size", "window_size", "qk_norm"):
        got = meta.get(name, WAN_DEFAULTS[name])
        got = tuple(got) if isinstance(got, list) else got
        if got != WAN_DEFAULTS[name]:
            raise ValueError(f"{where}: config.json {name}={got!r} is not supported (Wan2.1 "
                             f"text-to-video has {WAN_DEFAULTS[name]!r})")
    if shapes["patch_size"] != WAN_DEFAULTS["patch_size"]:
        raise ValueError(f"{where}: patch_embedding has patch {shapes['patch_size']}, only "
                         f"{WAN_DEFAULTS['patch_size']} is supported")
    for name in ("dim", "ffn_dim", "freq_dim", "text_dim", "in_dim", "out_dim", "num_layers",
                 "cross_attn_norm"):
        if name in meta and meta[name] != shapes[name]:
            raise ValueError(f"{where}: config.json says {name}={meta[name]!r} but the tensors "
                             f"have {shapes[name]!r}")
    heads = _pick("num_heads", num_heads, meta, where)
    if heads is None:
        by_width = {p.dim: p.num_heads for p in PRESETS.values() if p.dim >= 1536}
        heads = by_width.get(shapes["dim"])
    if heads is None:
        raise ValueError(f"{where}: width {shapes['dim']} matches no Wan preset and there is no "
                         "num_heads in config.json: pass num_heads=")
    text_len = _pick("text_len", text_len, meta, where)
    return DiTConfig(
        dim=shapes["dim"], num_heads=int(heads), num_layers=shapes["num_layers"],
        ffn_dim=shapes["ffn_dim"], freq_dim=shapes["freq_dim"], text_dim=shapes["text_dim"],
        text_len=int(WAN_DEFAULTS["text_len"] if text_len is None else text_len),
        in_dim=shapes["in_dim"], out_dim=shapes["out_dim"],
        eps=float(meta.get("eps", WAN_DEFAULTS["eps"])), cross_attn_norm=shapes["cross_attn_norm"],
        latent_hw=_latent_hw(latent_hw))


def _pick(name: str, arg, meta: dict, where: str):
    """``arg`` if given (and not contradicting config.json), else config.json's value or None."""
    if arg is not None:
        checks.positive_int(arg, name)
        if name in meta and meta[name] != arg:
            raise ValueError(f"{name}={arg} contradicts {where}'s config.json {name}={meta[name]}")
        return arg
    return meta.get(name)


def _latent_hw(latent_hw) -> tuple:
    if latent_hw is None:
        return WAN_LATENT_HW
    hw = tuple(latent_hw)
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 or v % 2 for v in hw):
        raise ValueError(f"latent_hw must be (height, width) of even ints >= 2, got {latent_hw!r}")
    return hw


def build(cls, cfg: DiTConfig, state: dict, where: str, dtype, device):
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = cls(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{where} does not match a Wan2.1 model: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    return model.to(device=device, dtype=dtype)


def folder_config(path) -> dict:
    """The ``config.json`` of a folder ({} for a file or a folder without one)."""
    cfg_file = os.path.join(os.fspath(path), "config.json") if isinstance(path, (str, os.PathLike)) else ""
    if not cfg_file or not os.path.isfile(cfg_file):
        return {}
    with open(cfg_file) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- diffusers

_DIFFUSERS_TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
    "patch_embedding": "patch_embedding",
}
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    # diffusers' norm2 is the affine cross-attention norm (Wan's norm3); its norm1 / norm3 have
    # no parameters.
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
# Fused copies diffusers adds with fuse_projections(); the separate projections stay alongside.
_DIFFUSERS_FUSED = (".to_qkv.", ".to_kv.", ".to_added_kv.")


def diffusers_to_wan(state: dict) -> dict:
    """diffusers ``WanTransformer3DModel`` parameter names -> Wan2.1 names."""
    refuse_image_models(state, "the diffusers model")
    out = {}
    for k, v in state.items():
        if any(f in k for f in _DIFFUSERS_FUSED):
            continue
        out[_diffusers_name(k)] = v
    return out


def _diffusers_name(k: str) -> str:
    m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k) or re.match(
        r"blocks\.(\d+)\.(scale_shift_table)()$", k)
    if m:
        i, name, leaf = m.groups()
        if name not in _DIFFUSERS_BLOCK:
            raise ValueError(f"unknown diffusers WanTransformer3DModel parameter {k!r}")
        return f"blocks.{i}.{_DIFFUSERS_BLOCK[name]}" + (f".{leaf}" if leaf else "")
    base, _, leaf = k.rpartition(".")
    if k == "scale_shift_table":
        return _DIFFUSERS_TOP[k]
    if base not in _DIFFUSERS_TOP:
        raise ValueError(f"unknown diffusers WanTransformer3DModel parameter {k!r}")
    return f"{_DIFFUSERS_TOP[base]}.{leaf}"


def diffusers_config(dcfg: dict, *, text_len=None, latent_hw=None) -> DiTConfig:
    """``DiTConfig`` of a diffusers ``WanTransformer3DModel`` config. diffusers has no
    ``text_len``: its pipeline pads prompts to ``max_sequence_length`` = 512, the default here."""
    for name, want in (("image_dim", None), ("added_kv_proj_dim", None), ("pos_embed_seq_len", None)):
        if dcfg.get(name, want) is not None:
            raise ValueError(f"diffusers config {name}={dcfg[name]!r}: image-to-video Wan models "
                             "are not supported, only the text-to-video DiT is")
    if tuple(dcfg.get("patch_size", (1, 2, 2))) != (1, 2, 2):
        raise ValueError(f"diffusers config patch_size={dcfg['patch_size']!r}: only (1, 2, 2) is "
                         "supported (Wan2.1; Wan2.2-5B uses another VAE and patch)")
    if dcfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"diffusers config qk_norm={dcfg['qk_norm']!r}: only "
                         "'rms_norm_across_heads' (Wan2.1's) is supported")
    heads, head_dim = dcfg.get("num_attention_heads", 40), dcfg.get("attention_head_dim", 128)
    if text_len is not None:
        checks.positive_int(text_len, "text_len")
    in_dim = dcfg.get("in_channels", 16)
    return DiTConfig(
        dim=heads * head_dim, num_heads=heads, num_layers=dcfg.get("num_layers", 40),
        ffn_dim=dcfg.get("ffn_dim", 13824), freq_dim=dcfg.get("freq_dim", 256),
        text_dim=dcfg.get("text_dim", 4096), text_len=512 if text_len is None else text_len,
        in_dim=in_dim, out_dim=dcfg.get("out_channels") or in_dim, eps=dcfg.get("eps", 1e-6),
        cross_attn_norm=bool(dcfg.get("cross_attn_norm", True)), latent_hw=_latent_hw(latent_hw))


def load_diffusers(model_or_path, dtype) -> tuple[dict, dict, str]:
    """(diffusers-named state dict, diffusers config, description) of a ``WanTransformer3DModel``
    instance or a folder holding its ``config.json`` and safetensors."""
    if isinstance(model_or_path, torch.nn.Module):
        cfg = getattr(model_or_path, "config", None)
        names = {c.__name__ for c in type(model_or_path).__mro__}
        if cfg is None or "WanTransformer3DModel" not in names:
            checks.fail_type("model_or_path must be a diffusers WanTransformer3DModel or a folder "
                             f"holding one, got a {type(model_or_path).__name__}")
        state = {k: _cast(v.detach().to("cpu"), dtype) for k, v in model_or_path.state_dict().items()}
        return state, dict(cfg), "the diffusers model"
    if not isinstance(model_or_path, (str, os.PathLike)) or not os.path.isdir(model_or_path):
        raise ValueError(f"model_or_path must be a WanTransformer3DModel or an existing folder "
                         f"with its config.json and safetensors, got {model_or_path!r}")
    path = os.fspath(model_or_path)
    if os.path.isdir(os.path.join(path, "transformer")):  # a whole pipeline folder
        path = os.path.join(path, "transformer")
    state, meta = load_files(path, None, dtype)
    if meta.get("_class_name") not in (None, "WanTransformer3DModel"):
        raise ValueError(f"{path!r}: config.json describes a {meta['_class_name']}, not a "
                         "WanTransformer3DModel")
    return state, meta, repr(path)
