"""cfx's DiffAE network (cfx_cli.models.diffae_beatgans): the released checkpoints' keys and
shapes, the reference implementation's outputs, Lightning checkpoint loading and its errors.

Fixtures (tests/fixtures/checkpoints/README_diffae.md): key/shape lists of the released
FFHQ-256 autoencoder and of the regression paper's square-64 model; tiny random models
with the outputs of phizaz/diffae's own code.
"""
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cfx_cli.errors import CfxError
from cfx_cli.models.diffae_beatgans import (FFHQ256_AUTOENC, SQUARE64_AUTOENC, DiffAEModel, _matching_preset,
                                            load_diffae_checkpoint)

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
RELEASED = {"keys_diffae_ffhq256_autoenc.json": FFHQ256_AUTOENC, "keys_dcfir_square64_diffae.json": SQUARE64_AUTOENC}
PARITY = json.loads((FIXTURES / "diffae_tiny_parity.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")  # small forwards: one thread is faster

# A small model of the released layout (resblock up/down, attention at 16, two-cond blocks).
SMALL = dict(FFHQ256_AUTOENC, image_size=32, model_channels=32, channel_mult=(1, 2), enc_channel_mult=(1, 2, 2),
             num_res_blocks=1, enc_num_res_block=1, embed_channels=64, enc_out_channels=64)


def _released(name):
    spec = json.loads((FIXTURES / name).read_text())
    return spec, {k.removeprefix("model."): tuple(s) for k, s in spec["keys"].items() if k.startswith("model.")}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_layouts_keys_shapes_and_counts(name):
    spec, want = _released(name)
    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["model_conf"].items()}
    assert RELEASED[name] == conf  # the preset is the file's model_conf, every flag
    with torch.device("meta"):  # 168 M parameters: no memory on meta
        model = DiffAEModel(**spec["model_conf"])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert sum(p.numel() for p in model.parameters()) == spec["param_count_model"]
    assert sum(p.numel() for p in model.encoder.parameters()) == spec["param_count_semantic_encoder"]
    # ema_model.* is the same network again
    assert {k.removeprefix("ema_model.") for k in spec["keys"] if k.startswith("ema_model.")} == set(want)
    assert _matching_preset(want) == {"keys_diffae_ffhq256_autoenc.json": "FFHQ256_AUTOENC"}.get(
        name, "SQUARE64_AUTOENC")


@pytest.mark.parametrize("config", sorted(PARITY["flags"]))
def test_tiny_models_match_the_reference_implementation(config):
    tensors = load_file(str(FIXTURES / "diffae_tiny_parity.safetensors"))
    prefix = f"{config}.state."
    model = DiffAEModel(**PARITY["flags"][config]).eval()
    model.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
                          strict=True)
    ref = {k.removeprefix(f"{config}."): v for k, v in tensors.items() if not k.startswith(prefix)}
    with torch.no_grad():
        z_sem = model.encode(ref["x"])
        eps = model(ref["x_t"], ref["t"], ref["z_sem"])
    torch.testing.assert_close(z_sem, ref["z_sem"], atol=1e-5, rtol=0)
    torch.testing.assert_close(eps, ref["eps"], atol=1e-5, rtol=0)


def _random_model(seed):
    torch.manual_seed(seed)
    model = DiffAEModel(**SMALL).eval()
    with torch.no_grad():  # the zero-initialised out convs would make eps identically 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _save_lightning_ckpt(path, monkeypatch, online, ema):
    """A file shaped as DiffAE's last.ckpt: model.* / ema_model.* / x_T, plus a trainer object
    of a class that is not importable where cfx loads it."""
    mod = types.ModuleType("fake_diffae_experiment")

    class LitModelCallback:
        def __init__(self):
            self.best = "/runs/ffhq256_autoenc/last.ckpt"

    LitModelCallback.__module__, LitModelCallback.__qualname__ = mod.__name__, "LitModelCallback"
    mod.LitModelCallback = LitModelCallback
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    state = {**{f"model.{k}": v for k, v in online.state_dict().items()},
             **{f"ema_model.{k}": v for k, v in ema.state_dict().items()}, "x_T": torch.randn(2, 3, 32, 32)}
    torch.save({"state_dict": state, "epoch": 7, "global_step": 100,
                "callbacks": {"LitModelCallback": LitModelCallback()}}, path)
    monkeypatch.delitem(sys.modules, mod.__name__)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("diffae") / "last.ckpt"
    online, ema = _random_model(0), _random_model(1)
    _save_lightning_ckpt(path, mp, online, ema)
    mp.undo()
    return path, online, ema


def test_lightning_checkpoint_loads_ema_and_online_weights(small_ckpt):
    path, online, ema = small_ckpt
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    x_t = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([3, 640])
    for weights, want in (("ema", ema), ("online", online)):
        model = load_diffae_checkpoint(path, weights=weights, **SMALL)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            z_sem = model.encode(x)
            assert z_sem.shape == (2, 64)
            torch.testing.assert_close(z_sem, want.encode(x), atol=0, rtol=0)
            eps = model(x_t, t, z_sem)
            assert eps.shape == x_t.shape and eps.abs().mean() > 0
            torch.testing.assert_close(eps, want(x_t, t, z_sem), atol=0, rtol=0)
            torch.testing.assert_close(model(x_t[1:], 640, z_sem[1:]), eps[1:], atol=1e-5, rtol=0)  # scalar t


def _one_line_error(match, *args, **kwargs):
    with pytest.raises(CfxError, match=match) as err:
        load_diffae_checkpoint(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_errors_are_one_line_and_name_key_path_and_fix(small_ckpt, tmp_path):
    path = small_ckpt[0]
    msg = _one_line_error("does not exist", tmp_path / "nope.ckpt", key="model.diffae")
    assert msg.startswith(f"model.diffae={tmp_path / 'nope.ckpt'}")
    _one_line_error(r"weights='best'.*'ema'.*'online'", path, weights="best", **SMALL)
    torch.save({"state_dict": {"unet.w": torch.ones(1)}}, tmp_path / "other.ckpt")
    _one_line_error(r"has no 'ema_model\.\*' weights.*\['unet'\].*DiffAE", tmp_path / "other.ckpt")
    # wrong flags: counts, first names, shapes and the fix
    msg = _one_line_error(r"diffusion.path=.*last.ckpt does not fit the DiffAE flags: \d+ missing, \d+ unexpected, "
                          r"\d+ mis-shaped", path, **dict(SMALL, channel_mult=(1, 2, 2)))
    assert "(missing input_blocks.4.0.in_layers.0.weight, " in msg and "; unexpected output_blocks" in msg
    assert msg.endswith("pass the flags the file was trained with (its model_conf: model_channels, channel_mult, "
                        "enc_channel_mult, attention_resolutions, ...)")
    msg = _one_line_error("mis-shaped", path, **dict(SMALL, embed_channels=32, enc_out_channels=32))
    assert "in the file" in msg and "in the model" in msg
    # flags that the original does not implement, or does not know
    with pytest.raises(CfxError, match="unknown DiffAE flag.*use_fp16"):
        DiffAEModel(**SMALL, use_fp16=True)
    with pytest.raises(CfxError, match="enc_pool='depthconv' is not supported"):
        DiffAEModel(**dict(SMALL, enc_pool="depthconv"))
    with pytest.raises(CfxError, match="resnet_cond_channels=None.*enc_out_channels=32"):
        DiffAEModel(**dict(SMALL, enc_out_channels=32))
