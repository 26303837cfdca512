"""cfx's own guided-diffusion (ADM) UNet: released checkpoints' keys and shapes, the
reference implementation's outputs, and the loader's errors.

Fixtures (tests/fixtures/adm/README.md) come from OpenAI's guided-diffusion; weights random.
"""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from cfx_cli.errors import CfxError
from cfx_cli.models.adm import ADMUNet, infer_adm_flags, load_adm_unet

FIXTURES = Path(__file__).parent / "fixtures" / "adm"
TINY = FIXTURES / "tiny_adm_celeba_format.pt"
RELEASED = json.loads((FIXTURES / "adm_checkpoint_keys.json").read_text())


pytestmark = pytest.mark.usefixtures("one_thread")  # small forwards: one thread is faster


@pytest.fixture(scope="module")
def tiny_flags():
    return json.loads((FIXTURES / "tiny_adm_flags.json").read_text())


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "tiny_adm_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny(tiny_flags):
    return load_adm_unet(TINY, **tiny_flags)


def _ref_output(model, ref):
    # The network receives the original timestep of each respaced index.
    with torch.no_grad():
        return model(ref["x_t"], ref["timestep_map"][ref["t_respaced"]])


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_keys_shapes_and_count(name):
    spec = RELEASED[name]
    with torch.device("meta"):  # the ImageNet model has 552 M parameters: no memory on meta
        model = ADMUNet(**spec["flags"])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: list(s) for k, s in spec["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"]
    # and the flags can be read back off the shapes (all but num_heads / num_head_channels)
    found = infer_adm_flags(spec["keys"], spec["flags"]["image_size"])
    given = {k: v for k, v in spec["flags"].items() if k in found}
    assert given == {k: found[k] for k in given}


def test_tiny_model_matches_the_reference_implementation(tiny, ref):
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())
    assert all(p.dtype == torch.float32 for p in tiny.parameters())
    out = _ref_output(tiny, ref)
    assert out.shape == (2, 6, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref["model_output_at_original_t"], atol=1e-5, rtol=0)


def test_fp16_and_safetensors_files_load_as_float32(tmp_path, tiny_flags):
    from safetensors.torch import save_file

    state = torch.load(TINY, weights_only=True)
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "half.pt")  # as the released files
    save_file(state, str(tmp_path / "tiny.safetensors"))
    half = load_adm_unet(tmp_path / "half.pt", **tiny_flags).state_dict()
    st = load_adm_unet(tmp_path / "tiny.safetensors", **tiny_flags).state_dict()
    for k, v in state.items():
        assert half[k].dtype == torch.float32 and torch.equal(half[k], v.half().float()), k
        assert torch.equal(st[k], v), k


def test_new_attention_order_is_the_same_attention_with_permuted_qkv(tiny_flags, ref):
    """Legacy qkv channels are [head][q|k|v][ch], the new order [q|k|v][head][ch]: permuting
    the qkv rows of the tiny file into the new order must give the same function."""
    state = torch.load(TINY, weights_only=True)
    with torch.device("meta"):
        new = ADMUNet(**tiny_flags, use_new_attention_order=True)
    for key in [k for k in state if k.endswith(".qkv.weight") or k.endswith(".qkv.bias")]:
        block = new.get_submodule(key.rsplit(".", 2)[0])
        c3 = state[key].shape[0]
        heads, ch = block.num_heads, c3 // 3 // block.num_heads
        state[key] = state[key].reshape(heads, 3, ch, *state[key].shape[1:]).transpose(0, 1).reshape(state[key].shape)
    new.load_state_dict(state, assign=True)
    new.eval()
    torch.testing.assert_close(_ref_output(new, ref), ref["model_output_at_original_t"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", [
    dict(resblock_updown=False, use_scale_shift_norm=False),  # conv Down/Upsample, additive embedding
    dict(class_cond=True, num_head_channels=16, use_new_attention_order=True, channel_mult=[1, 2]),
])
def test_other_variants_run(variant):
    torch.manual_seed(0)
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 learn_sigma=False)
    model = ADMUNet(**{**flags, **variant}).eval()
    for p in model.parameters():  # a fresh model is zero-initialised at its outputs
        torch.nn.init.normal_(p, std=0.1)
    y = torch.tensor([3, 999]) if variant.get("class_cond") else None
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = model(x, torch.tensor(10), y)  # a scalar t broadcasts
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    out.square().sum().backward()  # guidance differentiates through the UNet
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _one_line_error(fn) -> str:
    with pytest.raises(CfxError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("wrong, says", [
    (dict(num_channels=64), "num_channels=32 (not 64)"),
    (dict(learn_sigma=False), "learn_sigma=True"),
    (dict(attention_resolutions="16,8"), "attention_resolutions='8,4,2'"),
    (dict(channel_mult="1,1,2,2,4"), "channel_mult='1,1,2,2,2'"),
])
def test_wrong_flag_names_the_flag(tiny_flags, wrong, says):
    msg = _one_line_error(lambda: load_adm_unet(TINY, **{**tiny_flags, **wrong}))
    assert f"diffusion.path={TINY}" in msg and "mis-shaped" in msg and says in msg


def test_missing_file_and_unknown_flag(tmp_path, tiny_flags):
    msg = _one_line_error(lambda: load_adm_unet(tmp_path / "nope.pt", key="diffusion.path", **tiny_flags))
    assert "diffusion.path=" in msg and "does not exist" in msg and "download" in msg
    msg = _one_line_error(lambda: ADMUNet(**tiny_flags, num_chanels=32))
    assert "num_chanels" in msg


class _Evil:
    """Unpickling this runs os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_needing_code_is_refused_and_never_run(tmp_path, tiny_flags):
    marker = tmp_path / "pwned"
    torch.save({"time_embed.0.weight": _Evil(str(marker))}, tmp_path / "evil.pt")
    msg = _one_line_error(lambda: load_adm_unet(tmp_path / "evil.pt", **tiny_flags))
    assert "evil.pt" in msg and "not a plain tensor checkpoint" in msg
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Evil(str(marker))))  # the payload is real: plain unpickling runs it
    assert marker.exists()


def test_bf16_trunk_on_cpu_is_close_and_returns_float32(tiny_flags, ref):
    model = load_adm_unet(TINY, dtype="bf16", **tiny_flags)
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    assert model.time_embed[0].weight.dtype == model.out[2].weight.dtype == torch.float32
    out = _ref_output(model, ref)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref["model_output_at_original_t"], atol=5e-2, rtol=5e-2)
    model.set_compute_dtype(None)
    assert model.compute_dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_trunk_on_cuda(tiny_flags, ref, dtype):
    model = load_adm_unet(TINY, dtype=dtype, **tiny_flags).cuda()
    with torch.no_grad():
        out = model(ref["x_t"].cuda(), ref["timestep_map"][ref["t_respaced"]].cuda())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref["model_output_at_original_t"], atol=5e-2, rtol=5e-2)
