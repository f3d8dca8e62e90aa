"""``from_self_forcing_config``: a ``StreamingGenerator`` set up as a Self-Forcing / LongLive
inference config says (docs/spec.md §6).

How each field is read, as their ``pipeline/causal_inference.py`` / ``utils/wan_wrapper.py`` do
(defaults: Self-Forcing's ``configs/default_config.yaml`` and ``WanDiffusionWrapper``):

| config field | default | vidstream |
| --- | --- | --- |
| ``denoising_step_list`` | required | ``timesteps`` (a trailing 0 dropped: a step at t = 0 changes nothing) |
| ``warp_denoising_step`` | false | true: ``shift = timestep_shift``; false: steps as given (``shift = 1``) |
| ``model_kwargs.timestep_shift`` | 8.0 | ``shift`` (the top-level ``timestep_shift`` is training's) |
| ``num_frame_per_block`` | 1 | ``chunk_frames`` |
| ``model_kwargs.sink_size`` | 0 | ``sink_frames`` |
| ``model_kwargs.local_attn_size`` | -1 | ``recent_frames = local_attn_size - sink_size - chunk_frames`` |
| ``context_noise`` | 0 | ``context_noise`` |
| ``seed`` | 0 | ``seed`` |
| ``use_ema`` | false | loads ``generator_ema`` instead of ``generator`` from ``checkpoint`` |
| ``image_or_video_shape`` (or ``height``, ``width`` / 8) | 60 x 104 | ``latent_hw`` of ``checkpoint`` |

Positions are ``"absolute"`` (each frame keeps the temporal index it was generated at) and there
is no compressed mid memory (``mid_blocks=0``), as in both projects: the cache fields come from
``CacheConfig.from_self_forcing``.

Self-Forcing's KV cache holds ``local_attn_size`` frames: ``sink_size`` frames kept forever, then
the most recent frames including the chunk being denoised (``causal_model.py`` evicts the oldest
non-sink tokens once a write would overflow ``local_attn_size * frame_seqlen`` tokens, and every
pass attends the whole cache). So the previous frames kept besides the sink are
``local_attn_size - sink_size - num_frame_per_block``. ``local_attn_size = -1`` is global
attention: Self-Forcing then allocates 32760 tokens (21 latent frames at 1560 tokens a frame)
and cannot go past them; vidstream keeps a window of ``global_frames`` frames (default 21, the
same) and slides beyond it. Pass ``global_frames=F`` to attend all of an ``F``-frame video.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

from ..ops import checks
from .config import CacheConfig
from .generator import StreamingGenerator
from .model import StreamingDiT

# Self-Forcing's configs/default_config.yaml, merged under every config by its inference.py.
SELF_FORCING_DEFAULTS = {"warp_denoising_step": False, "context_noise": 0,
                         "independent_first_frame": False}
WAN_SHIFT_DEFAULT = 8.0            # WanDiffusionWrapper(timestep_shift=8.0)
SELF_FORCING_GLOBAL_FRAMES = 21    # 32760 cache tokens / 1560 tokens a frame
_WIDTHS = {"Wan2.1-T2V-1.3B": 1536, "Wan2.1-T2V-14B": 5120}


def from_self_forcing_config(cfg, model: Optional[StreamingDiT] = None, *,
                             checkpoint: Optional[str] = None, use_ema: Optional[bool] = None,
                             global_frames: int = SELF_FORCING_GLOBAL_FRAMES,
                             **overrides) -> StreamingGenerator:
    """The ``StreamingGenerator`` of a Self-Forcing / LongLive inference config (a dict, or the
    path of its YAML file), mapped as the module docstring says.

    The model: ``model`` (a ``StreamingDiT``), or loaded from ``checkpoint`` (a Self-Forcing /
    LongLive ``.pt``; ``generator`` unless ``use_ema`` or the config's ``use_ema`` says EMA). A
    config's ``generator_ckpt`` is not loaded by itself: in Self-Forcing's configs it is the
    training initialisation (``checkpoints/ode_init.pt``), not the model to run. Configs with a
    LoRA ``adapter`` / ``lora_ckpt`` (LongLive) need the LoRA merged into the weights first: pass
    the merged model as ``model``. ``overrides``: any ``StreamingGenerator`` keyword, applied last
    (``cache="naive"``, ``batch=2``, ``compile=True``, ...)."""
    checks.positive_int(global_frames, "global_frames")
    cfg = {**SELF_FORCING_DEFAULTS, **_as_dict(cfg)}
    mk = dict(cfg.get("model_kwargs") or {})
    _check_supported(cfg, mk)
    if model is None:
        model = _load_model(cfg, checkpoint, use_ema)
    elif not isinstance(model, StreamingDiT):
        checks.fail_type(f"model must be a StreamingDiT, got {type(model).__name__}")
    _check_width(cfg, mk, model)
    kwargs = dict(_cache_kwargs(cfg, mk, global_frames), **_schedule_kwargs(cfg, mk),
                  context_noise=cfg["context_noise"], seed=int(cfg.get("seed", 0)))
    kwargs.update(overrides)
    return StreamingGenerator(model, **kwargs)


def _as_dict(cfg) -> dict:
    if isinstance(cfg, (str, os.PathLike)):
        try:
            import yaml
        except ImportError:
            raise ImportError("reading a YAML config needs PyYAML: pip install pyyaml") from None
        with open(cfg) as f:
            cfg = yaml.safe_load(f)
    if not isinstance(cfg, Mapping):
        checks.fail_type(f"cfg must be a dict or the path of a YAML file, got {type(cfg).__name__}")
    return dict(cfg)


def _check_supported(cfg: dict, mk: dict) -> None:
    if "denoising_step_list" not in cfg:
        raise ValueError("the config has no denoising_step_list: many-step diffusion configs "
                         "(Self-Forcing's CausalDiffusionInferencePipeline) are not supported")
    if cfg["independent_first_frame"]:
        raise ValueError("independent_first_frame=true (a 1-frame first chunk) is not supported: "
                         "every chunk has num_frame_per_block frames")
    name = mk.get("model_name", cfg.get("model_name", "Wan2.1-T2V-1.3B"))
    if name not in _WIDTHS:
        raise ValueError(f"model_name {name!r} is not supported: only {sorted(_WIDTHS)}")


def _check_width(cfg: dict, mk: dict, model: StreamingDiT) -> None:
    # Only a real Wan width can contradict model_name; a small test model cannot.
    name = mk.get("model_name", cfg.get("model_name", "Wan2.1-T2V-1.3B"))
    if model.config.dim in _WIDTHS.values() and model.config.dim != _WIDTHS[name]:
        raise ValueError(f"the config's model_name is {name} (width {_WIDTHS[name]}), the model "
                         f"has width {model.config.dim}")


def _load_model(cfg: dict, checkpoint, use_ema) -> StreamingDiT:
    if checkpoint is None:
        raise ValueError("pass model= (a StreamingDiT) or checkpoint= (the .pt to run): a config's "
                         "generator_ckpt is its training initialisation, not loaded by itself")
    if cfg.get("adapter") or cfg.get("lora_ckpt"):
        raise ValueError("the config applies a LoRA adapter (lora_ckpt), which vidstream cannot "
                         "load: merge it into the generator weights and pass model=")
    ema = bool(cfg.get("use_ema", False)) if use_ema is None else use_ema
    shape = cfg.get("image_or_video_shape")
    if shape is not None:
        latent_hw = (int(shape[3]), int(shape[4]))
    else:
        latent_hw = (int(cfg.get("height", 480)) // 8, int(cfg.get("width", 832)) // 8)
    # key=None is "generator" in a Self-Forcing file and a plain state dict as it is.
    return StreamingDiT.from_pretrained(checkpoint, key="generator_ema" if ema else None,
                                        latent_hw=latent_hw)


def _cache_kwargs(cfg: dict, mk: dict, global_frames: int) -> dict:
    local = mk.get("local_attn_size", -1)
    c = CacheConfig.from_self_forcing(  # the one place the window mapping is written
        num_frame_per_block=cfg.get("num_frame_per_block", 1), sink_size=mk.get("sink_size", 0),
        local_attn_size=global_frames if local == -1 else local)
    return {name: getattr(c, name) for name in ("chunk_frames", "sink_frames", "recent_frames",
                                                "mid_blocks", "top_k", "positions")}


def _schedule_kwargs(cfg: dict, mk: dict) -> dict:
    steps = [int(t) for t in cfg["denoising_step_list"]]
    if len(steps) > 1 and steps[-1] == 0:
        steps = steps[:-1]  # Self-Forcing's comment: remove the 0 when warping
    if not cfg["warp_denoising_step"]:
        # The steps are fed as timesteps and sigma is read back from them: sigma = t / 1000.
        return {"timesteps": tuple(steps), "shift": 1.0}
    return {"timesteps": tuple(steps), "shift": float(mk.get("timestep_shift", WAN_SHIFT_DEFAULT))}
