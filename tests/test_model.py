"""StreamingDiT: Wan2.1's parameter names and shapes, checkpoint loading, seeding."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from vidstream.streaming import FullSequenceAttention, StreamingDiT
from vidstream.streaming.model import PRESETS, sinusoidal_embedding


def wan_state_shapes(dim, ffn, layers, freq, text, in_dim=16, out_dim=16):
    """Key -> shape of Wan2.1's WanModel (t2v, cross_attn_norm) state dict, written out here from
    the Wan2.1 module structure, independently of vidstream.streaming.model."""
    s = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (out_dim * 4, dim), "head.head.bias": (out_dim * 4,),
        "head.modulation": (1, 2, dim),
    }
    for i in range(layers):
        b = f"blocks.{i}."
        for att in ("self_attn", "cross_attn"):
            for p in "qkvo":
                s[f"{b}{att}.{p}.weight"] = (dim, dim)
                s[f"{b}{att}.{p}.bias"] = (dim,)
            s[f"{b}{att}.norm_q.weight"] = (dim,)
            s[f"{b}{att}.norm_k.weight"] = (dim,)
        s[f"{b}norm3.weight"] = (dim,)
        s[f"{b}norm3.bias"] = (dim,)
        s[f"{b}ffn.0.weight"] = (ffn, dim)
        s[f"{b}ffn.0.bias"] = (ffn,)
        s[f"{b}ffn.2.weight"] = (dim, ffn)
        s[f"{b}ffn.2.bias"] = (dim,)
        s[f"{b}modulation"] = (1, 6, dim)
    return s


def test_parameter_names_and_shapes_are_wan21():
    c = PRESETS["tiny"]
    m = StreamingDiT("tiny")
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == wan_state_shapes(c.dim, c.ffn_dim, c.num_layers, c.freq_dim, c.text_dim)


def test_wan_1_3b_preset_shapes():
    c = PRESETS["wan-1.3b"]
    assert (c.dim, c.num_heads, c.num_layers, c.ffn_dim, c.text_dim, c.text_len) == (
        1536, 12, 30, 8960, 4096, 512)
    assert c.frame_shape == (30, 52) and c.head_dim == 128
    with torch.device("meta"):
        m = StreamingDiT("wan-1.3b")
    n = sum(p.numel() for p in m.parameters())
    assert 1.2e9 < n < 1.5e9  # Wan2.1-T2V-1.3B
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == wan_state_shapes(
        1536, 8960, 30, 256, 4096)


def test_wan_14b_preset_shapes():
    c = PRESETS["wan-14b"]  # Wan2.1 wan/configs/wan_t2v_14B.py, shared_config.text_len
    assert (c.dim, c.num_heads, c.num_layers, c.ffn_dim, c.freq_dim, c.text_dim, c.text_len) == (
        5120, 40, 40, 13824, 256, 4096, 512)
    assert c.latent_hw == (480 // 8, 832 // 8) and c.frame_shape == (30, 52) and c.head_dim == 128
    with torch.device("meta"):
        m = StreamingDiT("wan-14b")
    assert 13.5e9 < sum(p.numel() for p in m.parameters()) < 14.5e9


def _synthetic_checkpoint(cfg):
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(shape, generator=g) * 0.1
            for k, shape in wan_state_shapes(cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.freq_dim,
                                             cfg.text_dim).items()}


def _outputs(m):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 8, 8, generator=g)
    text = torch.randn(1, 5, m.config.text_dim, generator=g)
    with torch.no_grad():
        return m(x, torch.tensor([[900.0] * 3 + [0.0] * 3]), m.text_kv(text),
                 FullSequenceAttention(chunk_frames=3))


@pytest.mark.parametrize("fmt", ["safetensors", "folder", "torch-self-forcing"])
def test_from_pretrained_loads_wan_key_names(tmp_path, fmt):
    cfg = replace(PRESETS["tiny"], num_layers=3)
    state = _synthetic_checkpoint(cfg)
    if fmt == "safetensors":
        path = str(tmp_path / "model.safetensors")
        save_file(state, path)
    elif fmt == "folder":
        half = len(state) // 2
        items = list(state.items())
        save_file(dict(items[:half]), str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
        save_file(dict(items[half:]), str(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"))
        with open(tmp_path / "config.json", "w") as f:
            f.write('{"num_heads": 4, "dim": 64, "text_len": 8}')
        path = str(tmp_path)
    else:  # Self-Forcing: {"generator": {"model.<wan key>": ...}, "generator_ema": {...}}
        path = str(tmp_path / "self_forcing.pt")
        torch.save({"generator": {f"model.{k}": v for k, v in state.items()},
                    "generator_ema": {f"model.{k}": -v for k, v in state.items()}}, path)
    given = {} if fmt == "folder" else {"num_heads": 4, "text_len": 8}  # folder: config.json's
    m = StreamingDiT.from_pretrained(path, **given)
    assert m.config.num_layers == 3 and m.config.num_heads == 4 and m.config.dim == 64
    assert m.config.text_len == 8
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    ref = StreamingDiT(cfg)
    ref.load_state_dict(state)
    torch.testing.assert_close(_outputs(m), _outputs(ref), atol=0, rtol=0)


def test_from_pretrained_rejects_other_models(tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not a Wan2.1 state dict"):
        StreamingDiT.from_pretrained(path)
    cfg = PRESETS["tiny"]
    state = _synthetic_checkpoint(cfg)
    state["blocks.0.extra.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(ValueError, match="unexpected"):
        StreamingDiT.from_pretrained(path, num_heads=4)


def test_random_weights_are_seeded():
    a, b, c = StreamingDiT("tiny", seed=1), StreamingDiT("tiny", seed=1), StreamingDiT("tiny", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.self_attn.q.weight"], sc["blocks.0.self_attn.q.weight"])
    assert _outputs(a).abs().max() > 0  # the head is not zero-initialised: random weights give a signal


def test_timestep_embedding_matches_wan_formula():
    t = torch.tensor([0.0, 250.0, 1000.0])
    e = sinusoidal_embedding(8, t)
    half = torch.arange(4, dtype=torch.float64)
    ang = t.double()[:, None] * 10000.0 ** (-half / 4)
    torch.testing.assert_close(e, torch.cat([ang.cos(), ang.sin()], 1).float())


def test_bad_inputs():
    m = StreamingDiT("tiny")
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 15, 3, 8, 8), 0.0, [], None)
    with pytest.raises(ValueError, match="text embeddings"):
        m.text_kv(torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match="preset"):
        StreamingDiT("wan-14b-typo")
    with pytest.raises(ValueError, match="more than the model's text_len=8"):
        m.text_kv(torch.randn(1, 9, m.config.text_dim))
