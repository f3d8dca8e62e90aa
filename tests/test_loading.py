"""Checkpoint loading (vidstream/streaming/loading.py) and from_self_forcing_config: Wan2.1's
config.json fields, Self-Forcing's generator / generator_ema, safetensors (fp8), refusals, and the
Self-Forcing / LongLive config mapping."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from test_model import wan_state_shapes

from vidstream.streaming import StreamingDiT, from_self_forcing_config, warp_timesteps
from vidstream.streaming.model import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# A width-128, 2-head model: no preset has that width, and 128 // 128 = 1 head would be wrong.
SMALL = replace(PRESETS["tiny"], dim=128, num_heads=2, num_layers=2, text_len=6)


def _state(cfg, gen=None):
    gen = gen or torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    return {k: torch.randn(s, generator=gen) * 0.1 for k, s in wan_state_shapes(
        cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.freq_dim, cfg.text_dim).items()}


def _wan_folder(tmp_path, state, **config):
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _assert_loaded(m, state):
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k].to(v.dtype)), k


def test_every_wan_config_field_is_read(tmp_path):
    state = _state(SMALL)
    # What Wan2.1's WanModel.save_pretrained writes (ignore_for_config drops five fields), plus
    # the five it drops, as another writer might include them.
    path = _wan_folder(tmp_path, state, _class_name="WanModel", model_type="t2v", patch_size=[1, 2, 2],
                       text_len=6, in_dim=16, dim=128, ffn_dim=SMALL.ffn_dim, freq_dim=SMALL.freq_dim,
                       text_dim=SMALL.text_dim, out_dim=16, num_heads=2, num_layers=2,
                       window_size=[-1, -1], qk_norm=True, cross_attn_norm=True, eps=1e-5)
    m = StreamingDiT.from_pretrained(path)
    assert m.config == replace(SMALL, eps=1e-5, latent_hw=(60, 104))
    assert m.blocks[0].self_attn.norm_q.eps == 1e-5 and m.blocks[0].norm1.eps == 1e-5
    _assert_loaded(m, state)


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "i2v", "model_type='i2v' is not supported"),
    ("window_size", [4, 4], r"window_size=\(4, 4\) is not supported"),
    ("qk_norm", False, "qk_norm=False is not supported"),
    ("patch_size", [1, 4, 4], r"patch_size=\(1, 4, 4\) is not supported"),
    ("dim", 256, "config.json says dim=256 but the tensors have 128"),
    ("num_layers", 3, "num_layers=3 but the tensors have 2"),
])
def test_config_fields_that_cannot_be_honoured_raise(tmp_path, field, value, match):
    path = _wan_folder(tmp_path, _state(SMALL), num_heads=2, **{field: value})
    with pytest.raises(ValueError, match=match):
        StreamingDiT.from_pretrained(path)


def test_heads_and_text_len_without_config(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file(_state(SMALL), path)
    with pytest.raises(ValueError, match="width 128 matches no Wan preset.*pass num_heads="):
        StreamingDiT.from_pretrained(path)
    m = StreamingDiT.from_pretrained(path, num_heads=2)
    assert m.config.num_heads == 2 and m.config.text_len == 512 and m.config.latent_hw == (60, 104)
    m = StreamingDiT.from_pretrained(path, num_heads=2, text_len=6, latent_hw=(8, 8))
    assert m.config == SMALL
    (tmp_path / "f").mkdir()
    folder = _wan_folder(tmp_path / "f", _state(SMALL), num_heads=2, text_len=6)
    with pytest.raises(ValueError, match="num_heads=4 contradicts"):
        StreamingDiT.from_pretrained(folder, num_heads=4)


def test_text_longer_than_text_len_raises(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file(_state(SMALL), path)
    m = StreamingDiT.from_pretrained(path, num_heads=2, text_len=6)
    m.text_kv(torch.randn(1, 6, SMALL.text_dim))
    with pytest.raises(ValueError, match="7 tokens, more than the model's text_len=6"):
        m.text_kv(torch.randn(1, 7, SMALL.text_dim))


def test_self_forcing_checkpoint_key(tmp_path):
    regular, ema = _state(SMALL), _state(SMALL)
    path = str(tmp_path / "self_forcing_dmd.pt")
    wrap = "model._fsdp_wrapped_module."  # FSDP-saved names seen in Self-Forcing checkpoints
    torch.save({"generator": {f"model.{k}": v for k, v in regular.items()},
                "generator_ema": {f"{wrap}{k}": v for k, v in ema.items()}}, path)
    _assert_loaded(StreamingDiT.from_pretrained(path, num_heads=2), regular)  # inference.py's default
    _assert_loaded(StreamingDiT.from_pretrained(path, key="generator", num_heads=2), regular)
    _assert_loaded(StreamingDiT.from_pretrained(path, key="generator_ema", num_heads=2), ema)
    with pytest.raises(ValueError, match="key='critic'.*entries are \\['generator', 'generator_ema'\\]"):
        StreamingDiT.from_pretrained(path, key="critic", num_heads=2)
    only_ema = str(tmp_path / "ema.pt")
    torch.save({"generator_ema": ema}, only_ema)
    with pytest.raises(ValueError, match="holds only 'generator_ema': pass key='generator_ema'"):
        StreamingDiT.from_pretrained(only_ema, num_heads=2)
    plain = str(tmp_path / "plain.pt")
    torch.save(regular, plain)
    _assert_loaded(StreamingDiT.from_pretrained(plain, num_heads=2), regular)
    with pytest.raises(ValueError, match="key='generator'.*a plain state dict"):
        StreamingDiT.from_pretrained(plain, key="generator", num_heads=2)


def test_flat_safetensors_with_generator_groups(tmp_path):
    regular, ema = _state(SMALL), _state(SMALL)
    path = str(tmp_path / "sf.safetensors")
    save_file({**{f"generator.model.{k}": v for k, v in regular.items()},
               **{f"generator_ema.model.{k}": v for k, v in ema.items()}}, path)
    _assert_loaded(StreamingDiT.from_pretrained(path, num_heads=2), regular)
    _assert_loaded(StreamingDiT.from_pretrained(path, key="generator_ema", num_heads=2), ema)


@pytest.mark.parametrize("fp8", [n for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)])
def test_fp8_safetensors_are_upcast(tmp_path, fp8):
    state = {k: v.to(getattr(torch, fp8)) for k, v in _state(SMALL).items()}
    path = str(tmp_path / "fp8.safetensors")
    save_file(state, path)
    for dtype in (torch.float32, torch.bfloat16):
        m = StreamingDiT.from_pretrained(path, num_heads=2, dtype=dtype)
        assert m.dtype == dtype
        _assert_loaded(m, {k: v.to(torch.float32) for k, v in state.items()})


def test_safetensors_are_read_memory_mapped(tmp_path, monkeypatch):
    """Through safetensors.safe_open, one tensor at a time (not load_file / a bytes read)."""
    import safetensors
    import safetensors.torch

    opened = []
    real = safetensors.safe_open

    def spy(*a, **k):
        opened.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    monkeypatch.setattr(safetensors.torch, "load_file", None)  # unused
    path = str(tmp_path / "m.safetensors")
    state = _state(SMALL)
    save_file(state, path)
    _assert_loaded(StreamingDiT.from_pretrained(path, num_heads=2), state)
    assert opened == [path]


@pytest.mark.parametrize("extra", ["blocks.0.cross_attn.k_img.weight", "img_emb.proj.0.weight"])
def test_image_to_video_checkpoints_are_refused(tmp_path, extra):
    state = _state(SMALL)
    state[extra] = torch.zeros(4)
    path = str(tmp_path / "i2v.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match="image-to-video .* not supported"):
        StreamingDiT.from_pretrained(path, num_heads=2)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        StreamingDiT.from_pretrained(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="no .safetensors files"):
        StreamingDiT.from_pretrained(str(tmp_path))
    with pytest.raises(TypeError, match="path must be a file or folder path"):
        StreamingDiT.from_pretrained(3)


# ----------------------------------------------------------------------------- Self-Forcing configs

# Self-Forcing configs/self_forcing_dmd.yaml (guandeh17/Self-Forcing): the inference fields.
SELF_FORCING_DMD = {
    "generator_ckpt": "checkpoints/ode_init.pt",
    "denoising_step_list": [1000, 750, 500, 250],
    "warp_denoising_step": True,
    "num_train_timestep": 1000,
    "timestep_shift": 5.0,
    "seed": 0,
    "image_or_video_shape": [1, 21, 16, 60, 104],
    "num_frame_per_block": 3,
    "model_kwargs": {"timestep_shift": 5.0},
}
# LongLive v1 configs/longlive_inference.yaml (NVlabs/LongLive before "LongLive 2.0").
LONGLIVE = {
    "denoising_step_list": [1000, 750, 500, 250],
    "warp_denoising_step": True,
    "num_frame_per_block": 3,
    "model_name": "Wan2.1-T2V-1.3B",
    "model_kwargs": {"local_attn_size": 12, "timestep_shift": 5.0, "sink_size": 3},
    "num_output_frames": 120,
    "use_ema": False,
    "seed": 0,
    "global_sink": True,
    "context_noise": 0,
    "generator_ckpt": "longlive_models/models/longlive_base.pt",
    "lora_ckpt": "longlive_models/models/lora.pt",
    "adapter": {"type": "lora", "rank": 256, "alpha": 256, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def tiny():
    return StreamingDiT("tiny", seed=0)


def _fields(g):
    c = g.config
    return (c.chunk_frames, c.sink_frames, c.recent_frames, c.mid_blocks, c.top_k, c.positions)


def test_self_forcing_dmd_config(tiny):
    g = from_self_forcing_config(SELF_FORCING_DMD, tiny)
    # local_attn_size -1 (global): Self-Forcing's 32760-token cache = 21 frames, sink 0.
    assert _fields(g) == (3, 0, 21 - 0 - 3, 0, None, "absolute")
    assert g.sigmas == pytest.approx([t / 1000 for t in warp_timesteps([1000, 750, 500, 250], 5.0)])
    assert g.context_noise == 0 and g.seed == 0 and g.cache_kind == "bounded"
    g = from_self_forcing_config(SELF_FORCING_DMD, tiny, global_frames=30)
    assert g.config.recent_frames == 27


def test_longlive_config(tiny, tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "longlive_inference.yaml"
    path.write_text(yaml.safe_dump(LONGLIVE))
    for cfg in (LONGLIVE, str(path)):
        g = from_self_forcing_config(cfg, tiny)  # model given: the LoRA is the caller's to merge
        # KV cache of 12 frames = sink 3 + 6 previous frames + the 3-frame chunk being denoised.
        assert _fields(g) == (3, 3, 12 - 3 - 3, 0, None, "absolute")
        assert g.sigmas[0] == 1.0 and g.sigmas[1] == pytest.approx(0.9375)


def test_config_schedule_and_overrides(tiny):
    cfg = {**SELF_FORCING_DMD, "warp_denoising_step": False, "context_noise": 50,
           "denoising_step_list": [1000, 500, 0], "model_kwargs": {"local_attn_size": 9}}
    g = from_self_forcing_config(cfg, tiny, cache="naive", batch=2)
    # (only the fields: a window of any frame count is the cache's business, issue #13)
    odd = from_self_forcing_config({**LONGLIVE, "model_kwargs": {"local_attn_size": 13, "sink_size": 2}},
                                   tiny)
    assert _fields(odd) == (3, 2, 13 - 2 - 3, 0, None, "absolute")
    # unwarped: the steps are the timesteps (sigma = t / 1000); the trailing 0 is dropped
    assert g.sigmas == [1.0, 0.5] and g.context_noise == 50
    assert _fields(g) == (3, 0, 6, 0, None, "absolute") and g.cache_kind == "naive" and g.batch == 2
    # warped without model_kwargs.timestep_shift: WanDiffusionWrapper's default 8.0
    g = from_self_forcing_config({"denoising_step_list": [750], "warp_denoising_step": True}, tiny)
    assert g.sigmas == pytest.approx([warp_timesteps([750], 8.0)[0] / 1000])
    assert g.config.chunk_frames == 1  # num_frame_per_block's default


def test_config_refusals(tiny, tmp_path):
    with pytest.raises(ValueError, match="pass model= .* or checkpoint="):
        from_self_forcing_config(SELF_FORCING_DMD)
    with pytest.raises(ValueError, match="LoRA adapter"):
        from_self_forcing_config(LONGLIVE, checkpoint=str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="no denoising_step_list"):
        from_self_forcing_config({"num_frame_per_block": 3}, tiny)
    with pytest.raises(ValueError, match="independent_first_frame"):
        from_self_forcing_config({**SELF_FORCING_DMD, "independent_first_frame": True}, tiny)
    with pytest.raises(ValueError, match="model_name 'Wan2.2-TI2V-5B' is not supported"):
        from_self_forcing_config({**SELF_FORCING_DMD, "model_kwargs": {"model_name": "Wan2.2-TI2V-5B"}},
                                 tiny)
    with pytest.raises(ValueError, match=r"local_attn_size \(5\) must .*hold sink_size \(3\)"):
        from_self_forcing_config({**LONGLIVE, "model_kwargs": {"local_attn_size": 5, "sink_size": 3}},
                                 tiny)
    with pytest.raises(TypeError, match="cfg must be a dict or the path of a YAML file"):
        from_self_forcing_config(3, tiny)


@pytest.mark.parametrize("use_ema", [None, False, True])
def test_config_loads_the_checkpoint_it_is_given(tmp_path, use_ema):
    cfg = replace(SMALL, text_len=512, latent_hw=(4, 6))
    regular, ema = _state(cfg), _state(cfg)
    # Width 128 is no Wan preset, so the heads come from a config.json: a safetensors folder
    # holding Self-Forcing's two state dicts flat.
    save_file({**{f"generator.{k}": v for k, v in regular.items()},
               **{f"generator_ema.{k}": v for k, v in ema.items()}}, str(tmp_path / "m.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}))
    config = {**SELF_FORCING_DMD, "image_or_video_shape": [1, 21, 16, 4, 6], "use_ema": True}
    g = from_self_forcing_config(config, checkpoint=str(tmp_path), use_ema=use_ema)
    assert g.model.config == cfg
    _assert_loaded(g.model, regular if use_ema is False else ema)  # None: the config's use_ema


@pytest.mark.parametrize("preset", ["wan-1.3b", "wan-14b"])
def test_wan_widths_give_their_heads_and_wan_defaults(preset):
    """A bare Wan2.1 file (no config.json): heads from the preset of its width, Wan's text_len
    512 and 832 x 480 video (60 x 104 latents). Shapes only: meta tensors, nothing allocated."""
    from vidstream.streaming.loading import wan_config

    p = PRESETS[preset]
    state = {k: torch.empty(s, device="meta") for k, s in wan_state_shapes(
        p.dim, p.ffn_dim, p.num_layers, p.freq_dim, p.text_dim).items()}
    assert wan_config(state, {}) == p
    real_config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": p.dim,
                   "eps": 1e-06, "ffn_dim": p.ffn_dim, "freq_dim": 256, "in_dim": 16,
                   "model_type": "t2v", "num_heads": p.num_heads, "num_layers": p.num_layers,
                   "out_dim": 16, "text_len": 512}  # the config.json Wan-AI publishes
    assert wan_config(state, real_config) == p
