"""The CompVis LDM cin256-v2 checkpoint onto diffusers modules: layout, loading, parity, errors.

Fixtures (tests/fixtures/checkpoints/):
- keys_ldm_cin256_v2.json: the released ckpt's state_dict keys and shapes (no weights);
- keys_ldm_cin256_v2_diffusers_converted.json, ldm_cin256_v2_diffusers_configs.json: the same after
  diffusers' single-file conversion, and the diffusers configs;
- ldm_tiny_parity.safetensors: a tiny LDM in the same block structure (channels 32/64, 16 VQ codes),
  made with CompVis/latent-diffusion's own ``openaimodel.UNetModel`` and ``Encoder``/``Decoder`` on the
  weights that :func:`ldm_weights` below makes (seeded): its key layout (metadata), inputs, and the
  reference outputs (UNet ε, VQ encode, VQ decode = nearest code → post_quant_conv → decoder).
"""
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cfx_cli.errors import CfxError
from cfx_cli.models.ldm_checkpoint import (
    CIN256_V2_UNET_CONFIG,
    CIN256_V2_VQ_CONFIG,
    convert_ldm_state_dict,
    load_ldm_checkpoint,
)

FIX = Path(__file__).parent / "fixtures" / "checkpoints"
PARITY = FIX / "ldm_tiny_parity.safetensors"

# diffusers configs of the tiny LDM (ldm: model_channels 32, channel_mult 1,1,2,2, attention at 8,4,2,
# num_heads 1, context 32; VQ ch 32, ch_mult 1,1,2, z 3, 16 codes of dim 3; 10 classes + unconditional).
SMALL_UNET = {**CIN256_V2_UNET_CONFIG, "sample_size": 8, "block_out_channels": [32, 32, 64, 64],
              "cross_attention_dim": 32}
SMALL_VQ = {**CIN256_V2_VQ_CONFIG, "block_out_channels": [32, 32, 64], "num_vq_embeddings": 16, "sample_size": 32}
SMALL_CLASSES = 10

# configs/latent-diffusion/cin256-v2.yaml (CompVis/latent-diffusion), the parts the diffusers helpers read.
CIN256_V2_YAML = {"model": {"params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64, "channels": 3,
    "unet_config": {"params": {
        "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
        "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512}},
    "first_stage_config": {"params": {"embed_dim": 3, "n_embed": 8192, "ddconfig": {
        "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
}}}


def ldm_weights(layout: dict, seed: int = 0) -> dict:
    """Deterministic random weights in LDM layout (the recipe the parity fixture was made with):
    uniform, fan-in scaled; 1-D weights (norms) around 1, 1-D biases small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        u = torch.rand(shape, generator=g) * 2 - 1
        if len(shape) > 1:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            out[k] = u * fan_in ** -0.5
        else:
            out[k] = 1 + 0.1 * u if k.endswith(".weight") else 0.1 * u
    return out


def schedule_buffers(start=0.0015, end=0.0195, n=1000) -> dict:
    """LatentDiffusion.register_schedule's buffers for its 'linear' schedule (float32, as saved)."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post = betas * (1 - prev) / (1 - ac)
    bufs = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
            "sqrt_recip_alphas_cumprod": ac.rsqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
            "posterior_variance": post, "posterior_log_variance_clipped": post.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
            "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac)}
    return {k: v.float() for k, v in bufs.items()}


@pytest.fixture(scope="module")
def parity():
    with safe_open(str(PARITY), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layout = json.loads(meta["layout"])
    weights = ldm_weights(layout, int(meta["seed"]))
    sums = torch.stack([weights[k].double().sum() for k in layout])
    # The fixture's outputs hold for exactly these weights: a changed RNG or recipe must not pass silently.
    assert torch.allclose(sums, tensors["fingerprint"], rtol=1e-6, atol=1e-6), "weights differ from the fixture's"
    return layout, weights, tensors


def _fake_trainer_module():
    """Stand-ins for pytorch_lightning's callback classes: importable only while the test writes the file."""
    mod = types.ModuleType("fake_pl_ldm_callbacks")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/logs/cin256-v2/last.ckpt"
            self.monitor = "val/loss_simple_ema"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    return mod


def write_lightning_ckpt(path: Path, state_dict: dict, monkeypatch) -> Path:
    mod = _fake_trainer_module()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    torch.save({"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.4.2", "state_dict": state_dict,
                "callbacks": {mod.ModelCheckpoint: mod.ModelCheckpoint()},  # PL 1.4 keys them by class
                "optimizer_states": [], "lr_schedulers": []}, path)
    monkeypatch.delitem(sys.modules, mod.__name__)  # the training code is absent where cfx runs
    return path


@pytest.fixture(scope="module")
def small(parity, tmp_path_factory):
    _, weights, _ = parity
    sd = {**schedule_buffers(), **weights}
    path = tmp_path_factory.mktemp("ldm") / "small.ckpt"
    with pytest.MonkeyPatch.context() as mp:
        write_lightning_ckpt(path, sd, mp)
    loaded = load_ldm_checkpoint(path, unet_config=SMALL_UNET, vq_config=SMALL_VQ, num_classes=SMALL_CLASSES)
    return sd, path, loaded


def test_mapping_of_the_released_layout_is_exact():
    """Every key of cin256-v2 lands on a diffusers key of the right shape; none is left over or missing."""
    layout = json.loads((FIX / "keys_ldm_cin256_v2.json").read_text())
    ref = json.loads((FIX / "keys_ldm_cin256_v2_diffusers_converted.json").read_text())
    configs = json.loads((FIX / "ldm_cin256_v2_diffusers_configs.json").read_text())
    assert configs == {"unet_config": CIN256_V2_UNET_CONFIG, "vq_config": CIN256_V2_VQ_CONFIG}
    assert layout["scale_factor"] == 1.0
    sd = {k: torch.empty(shape, device="meta") for k, shape in layout["keys"].items()}
    unet_sd, vq_sd, embed_sd = convert_ldm_state_dict(sd, CIN256_V2_UNET_CONFIG, CIN256_V2_VQ_CONFIG)
    shapes = lambda d: {k: list(v.shape) for k, v in d.items()}  # noqa: E731
    assert shapes(unet_sd) == ref["unet_keys"]
    assert shapes(vq_sd) == ref["vq_keys"]
    assert {"embedding." + k: v for k, v in shapes(embed_sd).items()} == ref["class_embedder"]
    # ... and these are exactly the keys and shapes of the diffusers modules the configs build.
    from diffusers import UNet2DConditionModel, VQModel

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**CIN256_V2_UNET_CONFIG), VQModel(**CIN256_V2_VQ_CONFIG)
    assert shapes(unet.state_dict()) == shapes(unet_sd)
    assert shapes(vae.state_dict()) == shapes(vq_sd)
    assert sum(v.numel() for v in unet_sd.values()) == ref["unet_param_count"] == 400920579


def test_shipped_configs_are_what_diffusers_derives_from_the_yaml():
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    with warnings.catch_warnings():  # image_size is deprecated there (given: no model type to infer it from)
        warnings.simplefilter("ignore")
        unet = create_unet_diffusers_config_from_ldm(CIN256_V2_YAML, {}, image_size=256)
        vae = create_vae_diffusers_config_from_ldm(CIN256_V2_YAML, {}, image_size=256, scaling_factor=1.0)
    assert unet == CIN256_V2_UNET_CONFIG
    assert {**vae, "num_vq_embeddings": 8192, "vq_embed_dim": 3, "norm_num_groups": 32} == CIN256_V2_VQ_CONFIG


def test_small_checkpoint_loads_with_its_weights(small):
    from diffusers import UNet2DConditionModel, VQModel

    sd, _, out = small
    unet, vae, emb = out["unet"], out["vae"], out["class_embedder"]
    assert isinstance(unet, UNet2DConditionModel) and isinstance(vae, VQModel)
    assert isinstance(emb, torch.nn.Embedding) and emb.weight.shape == (SMALL_CLASSES + 1, 32)
    for m in (unet, vae, emb):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    assert out["scale_factor"] == 1.0
    assert out["schedule"] == {"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195,
                               "num_train_timesteps": 1000}
    u, v = "model.diffusion_model.", "first_stage_model."
    pairs = [  # diffusers tensor ← LDM tensor, spelled out by hand (not by the helpers under test)
        (unet.conv_in.weight, sd[u + "input_blocks.0.0.weight"]),
        (unet.time_embedding.linear_2.weight, sd[u + "time_embed.2.weight"]),
        (unet.down_blocks[0].resnets[1].time_emb_proj.weight, sd[u + "input_blocks.2.0.emb_layers.1.weight"]),
        (unet.down_blocks[0].downsamplers[0].conv.weight, sd[u + "input_blocks.3.0.op.weight"]),
        (unet.down_blocks[2].resnets[0].conv_shortcut.weight, sd[u + "input_blocks.7.0.skip_connection.weight"]),
        (unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight,
         sd[u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]),
        (unet.down_blocks[3].attentions[1].proj_out.weight, sd[u + "input_blocks.11.1.proj_out.weight"]),
        (unet.mid_block.attentions[0].transformer_blocks[0].ff.net[0].proj.weight,
         sd[u + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"]),
        (unet.mid_block.resnets[1].norm2.weight, sd[u + "middle_block.2.out_layers.0.weight"]),
        (unet.up_blocks[0].upsamplers[0].conv.weight, sd[u + "output_blocks.2.2.conv.weight"]),
        (unet.up_blocks[2].attentions[2].norm.bias, sd[u + "output_blocks.8.1.norm.bias"]),
        (unet.up_blocks[3].resnets[2].conv2.weight, sd[u + "output_blocks.11.0.out_layers.3.weight"]),
        (unet.conv_out.bias, sd[u + "out.2.bias"]),
        (vae.encoder.down_blocks[2].resnets[0].conv_shortcut.weight,
         sd[v + "encoder.down.2.block.0.nin_shortcut.weight"]),
        (vae.encoder.mid_block.attentions[0].to_q.weight, sd[v + "encoder.mid.attn_1.q.weight"][:, :, 0, 0]),
        (vae.decoder.up_blocks[0].resnets[2].conv1.weight, sd[v + "decoder.up.2.block.2.conv1.weight"]),
        (vae.decoder.up_blocks[1].resnets[0].conv_shortcut.weight,
         sd[v + "decoder.up.1.block.0.nin_shortcut.weight"]),
        (vae.decoder.up_blocks[1].upsamplers[0].conv.weight, sd[v + "decoder.up.1.upsample.conv.weight"]),
        (vae.decoder.mid_block.attentions[0].to_out[0].weight,
         sd[v + "decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0]),
        (vae.quant_conv.weight, sd[v + "quant_conv.weight"]),
        (vae.post_quant_conv.bias, sd[v + "post_quant_conv.bias"]),
        (vae.quantize.embedding.weight, sd[v + "quantize.embedding.weight"]),
        (emb.weight, sd["cond_stage_model.embedding.weight"]),
    ]
    for got, want in pairs:
        assert torch.equal(got, want)
    # Every weight of the file is in a module: the loaded parameters sum to the file's network weights.
    total = sum(t.double().sum() for m in (unet, vae, emb) for t in m.state_dict().values())
    assert torch.allclose(total, sum(t.double().sum() for k, t in sd.items() if "." in k))


def test_small_checkpoint_matches_the_reference_ldm(small, parity):
    """Outputs equal CompVis latent-diffusion's own modules' on the same weights."""
    _, _, ref = parity
    out = small[2]
    with torch.no_grad():
        context = out["class_embedder"](ref["y"])[:, None, :]
        eps = out["unet"](ref["x"], ref["t"], encoder_hidden_states=context).sample
        z = out["vae"].encode(ref["image"]).latents
        image = out["vae"].decode(ref["z_in"]).sample
    assert eps.shape == (2, 3, 8, 8) and image.shape == (1, 3, 32, 32)
    torch.testing.assert_close(eps, ref["eps"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, ref["z_enc"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(image, ref["decoded"], atol=1e-5, rtol=1e-4)


def _expect_one_line(match, fn, *args, **kwargs):
    with pytest.raises(CfxError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def _variant(tmp_path, monkeypatch, sd, name="v.ckpt"):
    return write_lightning_ckpt(tmp_path / name, sd, monkeypatch)


def test_file_errors_are_one_line(tmp_path):
    _expect_one_line(r"ldm\.path=.*none\.ckpt does not exist", load_ldm_checkpoint, tmp_path / "none.ckpt",
                     key="ldm.path")
    torch.save({"epoch": 1, "global_step": 2}, tmp_path / "nosd.ckpt")
    _expect_one_line(r"diffusion\.path=.*nosd\.ckpt holds no 'state_dict'.*Lightning", load_ldm_checkpoint,
                     tmp_path / "nosd.ckpt")
    torch.save({"state_dict": {"model.w": torch.zeros(2)}}, tmp_path / "other.ckpt")
    _expect_one_line(r"other\.ckpt holds no LatentDiffusion weights.*model\.diffusion_model.*point diffusion\.path",
                     load_ldm_checkpoint, tmp_path / "other.ckpt")


def test_key_errors_are_one_line(small, tmp_path, monkeypatch):
    sd, path, _ = small
    load = lambda p, **kw: load_ldm_checkpoint(p, **{"unet_config": SMALL_UNET, "vq_config": SMALL_VQ,  # noqa: E731
                                                     "num_classes": SMALL_CLASSES, **kw})
    # a key the conversion does not place: the label embedding of a class-conditioned (ADM-style) UNet
    extra = {**sd, "model.diffusion_model.label_emb.weight": torch.zeros(10, 128)}
    msg = _expect_one_line(r"does not fit the UNet2DConditionModel config: 1 unexpected keys \(first: "
                           r"model\.diffusion_model\.label_emb\.weight\); pass the unet_config",
                           load, _variant(tmp_path, monkeypatch, extra, "extra.ckpt"))
    assert str(tmp_path / "extra.ckpt") in msg
    stray = {**sd, "cond_stage_model.transformer.weight": torch.zeros(2)}
    _expect_one_line(r"1 unexpected keys outside .* \(first: cond_stage_model\.transformer\.weight\)",
                     load, _variant(tmp_path, monkeypatch, stray, "stray.ckpt"))
    lost = {k: t for k, t in sd.items() if k != "first_stage_model.quantize.embedding.weight"}
    _expect_one_line(r"1 VQModel keys missing \(first: quantize\.embedding\.weight\); pass the vq_config",
                     load, _variant(tmp_path, monkeypatch, lost, "lost.ckpt"))
    _expect_one_line(r"\d+ keys do not fit the UNet2DConditionModel config; first: model\.diffusion_model\.input_blocks"
                     r"\.4\.1\.transformer_blocks\.0\.attn2\.to_k\.weight has shape \[32, 32\] but the config "
                     r"expects \[32, 64\].*pass the unet_config",
                     load, path, unet_config={**SMALL_UNET, "cross_attention_dim": 64})
    _expect_one_line(r"small\.ckpt does not fit the UNet2DConditionModel config: \d+ UNet2DConditionModel keys "
                     r"missing .*unexpected keys", load, path, unet_config={**SMALL_UNET, "layers_per_block": 1})
    _expect_one_line(r"unet_config does not build a diffusers UNet2DConditionModel .*fix unet_config", load, path,
                     unet_config={**SMALL_UNET, "down_block_types": ["NoSuchBlock2D"] * 4})
    _expect_one_line(r"cond_stage_model\.embedding\.weight has shape \[11, 32\] but num_classes=1000 needs 1001 rows"
                     r".*set num_classes=10", load, path, num_classes=1000)
    cosine = {**sd, "betas": torch.linspace(1e-4, 0.02, 1000)}
    _expect_one_line(r"betas are not LDM's 'linear'", load, _variant(tmp_path, monkeypatch, cosine, "lin.ckpt"))
    # the released cin256-v2 config on the small file: named, with the fix
    _expect_one_line(r"small\.ckpt.*pass the (unet|vq)_config", load_ldm_checkpoint, path)
