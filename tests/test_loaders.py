"""Loaders read files they (or the reference formats) wrote; untrusted pickles are refused."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from cfx_cli.errors import CfxError
from cfx_cli.models.checkpoints import load_state_dict
from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.models.generative import load_diffusers_ddpm
from cfx_cli.models.perceptual import VGGPerceptual, vgg19_features
from cfx_cli.models.small_cnn import SmallCNN, load_zoo_model, save_zoo_model
from cfx_cli.train.ddpm import build_unet

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_diffusers_folder_round_trip(tmp_path):
    from diffusers import DDPMScheduler

    unet = build_unet(16, channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8)
    unet.save_pretrained(tmp_path / "m" / "unet")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="linear").save_pretrained(tmp_path / "m" / "scheduler")
    d = load_diffusers_ddpm(tmp_path / "m")
    assert d.schedule.num_timesteps == 500 and d.image_size == 16 and d.latent_shape == (3, 16, 16)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 100])
    torch.testing.assert_close(d(x, t), unet(x, t).sample)
    r = DDPMSampler(d, 100)  # respaced: the network sees the original timesteps
    torch.testing.assert_close(r.predict(x, torch.tensor([1, 20]))["eps"],
                               unet(x, r.schedule.timestep_map[[1, 20]]).sample)


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(CfxError, match="diffusion.path=.* is not a diffusers DDPM folder"):
        load_diffusers_ddpm(tmp_path)


def test_zoo_round_trip(tmp_path):
    net = SmallCNN(2, 8).eval()
    save_zoo_model(net, tmp_path / "clf", "small_cnn", {"num_outputs": 2, "width": 8}, task="classification")
    loaded, info = load_zoo_model(tmp_path / "clf")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), net(x))
    assert info["task"] == "classification"


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_untrusted_pickle_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(CfxError, match="never unpickles"):
        load_state_dict(path, key="classifier.weights")
    assert "pwned" not in capsys.readouterr().out


def test_vgg_perceptual_loads_torchvision_layout(tmp_path):
    from torchvision.models import vgg19

    torch.manual_seed(0)
    feats = vgg19(weights=None).features  # the whole torchvision `features` block, as the released file has it
    save_file({f"features.{k}": v for k, v in feats.state_dict().items()}, str(tmp_path / "vgg19.safetensors"))
    perc = VGGPerceptual(str(tmp_path / "vgg19.safetensors"))
    assert [type(m) for m in perc.features] == [type(m) for m in vgg19_features(18, device="meta")]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # DiME: MSE of VGG19 features[:18] (relu3_4) of the ImageNet-normalised [0, 1] images
        fx, fy = feats[:18](((x + 1) / 2 - MEAN) / STD), feats[:18](((y + 1) / 2 - MEAN) / STD)
    torch.testing.assert_close(perc(x, y), (fx - fy).pow(2).mean(dim=(1, 2, 3)))
    assert torch.allclose(perc(x, x), torch.zeros(2))
    with pytest.raises(CfxError, match="method.perceptual_weights is null"):
        VGGPerceptual(None)
    bad = {f"features.{k}": v for k, v in feats.state_dict().items()}
    bad["features.5.weight"] = torch.zeros(128, 32, 3, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CfxError, match=r"method.perceptual_weights=.*bad.safetensors: features.5.weight has shape "
                                       r"\[128, 32, 3, 3\], expected \[128, 64, 3, 3\]"):
        VGGPerceptual(str(tmp_path / "bad.safetensors"))


def test_perceptual_clamp_passes_gradient_at_the_bounds_on_every_torch(tmp_path):
    """DiME's Normalizer clamps to [-1, 1]; the papers' torch (and torch <= 2.13) let the gradient through at
    exactly ±1, where DiME's clipped clean estimates sit; torch 2.14's clamp does not. cfx keeps the former."""
    from cfx_cli.models.perceptual import clamp_passing_bounds

    x = torch.tensor([-3.0, -1.0, -0.25, 1.0, 1.5], requires_grad=True)
    y = clamp_passing_bounds(x)
    assert y.tolist() == [-1.0, -1.0, -0.25, 1.0, 1.0]
    (g,) = torch.autograd.grad((y * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum(), x)
    assert g.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]

    g8 = torch.Generator().manual_seed(3)
    state = {f"features.{k}": torch.randn(v.shape, generator=g8) * 0.1
             for k, v in vgg19_features(18, device="meta").state_dict().items()}
    save_file(state, str(tmp_path / "vgg.safetensors"))
    perc = VGGPerceptual(str(tmp_path / "vgg.safetensors"))
    img = (torch.rand(1, 3, 8, 8, generator=g8) * 2 - 1)
    img[0, :, 2, 3] = torch.tensor([1.0, -1.0, 1.0])  # a clipped pixel
    img[0, :, 5, 5] = torch.tensor([1.3, -1.2, 2.0])  # outside: no gradient
    ref = torch.rand(1, 3, 8, 8, generator=g8) * 2 - 1
    x = img.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(perc(x, ref).sum(), x)
    free = img.clamp(-1, 1).requires_grad_(True)  # the same values, no clamp in the graph: the gradient at ±1
    (gf,) = torch.autograd.grad(perc.features(((free + 1) / 2 - MEAN) / STD).sub(
        perc.features(((ref + 1) / 2 - MEAN) / STD)).pow(2).mean(), free)
    assert gx[0, :, 2, 3].abs().min() > 0
    torch.testing.assert_close(gx[0, :, 2, 3], gf[0, :, 2, 3])
    assert torch.equal(gx[0, :, 5, 5], torch.zeros(3))


def test_compile_option_wraps_the_network_lazily(tmp_path):
    """diffusion.compile=true: the UNet is torch.compile'd on first use, kept out of the state dict;
    compile=false calls the plain module (the compiled path's speed is in scripts/bench_methods.py)."""
    unet = build_unet(16, channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8)
    from cfx_cli.diffusion.schedule import NoiseSchedule
    from cfx_cli.models.generative import PixelDiffusion

    plain = PixelDiffusion(unet, NoiseSchedule.from_config("linear", 100))
    fast = PixelDiffusion(unet, NoiseSchedule.from_config("linear", 100), compile=True)
    assert plain.network() is unet
    net = fast.network()
    assert net is not unet and net is fast.network() and isinstance(net, torch._dynamo.eval_frame.OptimizedModule)
    assert list(fast.state_dict()) == list(plain.state_dict())
