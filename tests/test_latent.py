"""Latent diffusion models from folders a user would have: class- and text-conditional, written here
in diffusers layout with tiny random components and read back through the loader `cfx run` uses."""
import json
import math

import pytest
import torch


from cfx_cli.errors import CfxError
from cfx_cli.methods.ldce import consensus_mask, rescale
from cfx_cli.models.latent import load_latent_diffusion
from cfx_cli.train.latent import build_autoencoder, build_latent_unet


def _common(folder, context_dim):
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    vae = build_autoencoder(16, channels=(16, 16), latent_channels=4)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(folder / "vae")
    build_latent_unet(8, 4, channels=(16, 32), context_dim=context_dim).save_pretrained(folder / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195).save_pretrained(
        folder / "scheduler")
    return vae


def test_class_conditional_folder(tmp_path):
    from safetensors.torch import save_file

    vae = _common(tmp_path, 8)
    (tmp_path / "class_embedder").mkdir()
    weight = torch.randn(3, 8)
    save_file({"weight": weight}, tmp_path / "class_embedder" / "model.safetensors")
    (tmp_path / "class_embedder" / "config.json").write_text(json.dumps({"num_classes": 2, "null_class": 2}))
    model = load_latent_diffusion(tmp_path)
    assert model.null_condition == 2 and model.latent_shape == (4, 8, 8) and model.image_size == 16
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.encode(x)
    assert torch.allclose(z, vae.encode(x).latent_dist.mode() * 0.5, atol=1e-6)  # scale · posterior mean
    assert torch.allclose(model.decode(z), vae.decode(z / 0.5).sample, atol=1e-6)
    model.sample_posterior = True  # a draw from the posterior with the caller's noise: mean + std · noise
    noise = torch.randn(2, *model.latent_shape)
    post = vae.encode(x).latent_dist
    assert torch.allclose(model.encode(x, noise), (post.mean + post.std * noise) * 0.5, atol=1e-6)
    model.sample_posterior = False
    t = torch.tensor([10, 10])
    # the context is the class embedding, a length-1 sequence; the null class is the last row
    eps_c = model(z, t, torch.tensor([0, 1]))
    ref = model.unet(z, t, encoder_hidden_states=weight[[0, 1]][:, None, :]).sample
    assert torch.allclose(eps_c, ref, atol=1e-6)
    assert torch.allclose(model(z, t), model(z, t, torch.tensor([2, 2])))
    with pytest.raises(CfxError, match="outside 0..2"):
        model(z, t, torch.tensor([0, 3]))
    # the schedule is the scheduler's scaled-linear one
    assert math.isclose(float(model.schedule.betas[0]), 0.0015, rel_tol=1e-9)
    assert math.isclose(float(model.schedule.betas[-1]), 0.0195, rel_tol=1e-9)


def _tiny_clip(folder, prompts):
    """A CLIP tokenizer whose vocabulary spells the prompts letter by letter, and a tiny random text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = sorted(set("".join(prompts).lower().replace(" ", "")))
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                        model_max_length=16)
    tok.save_pretrained(folder / "tokenizer")
    torch.manual_seed(1)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                       bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                       pad_token_id=vocab["<|endoftext|>"]))
    enc.save_pretrained(folder / "text_encoder")
    return tok, enc


def test_text_conditional_folder(tmp_path):
    _common(tmp_path, 16)
    tok, enc = _tiny_clip(tmp_path, ["a photo of a circle.", "a photo of a square."])
    model = load_latent_diffusion(tmp_path, prompt="a photo of a {}.")
    assert model.null_condition == -1
    model.set_class_names(["circle", "square"])
    ctx = model.conditioner(torch.tensor([1, -1]))

    def direct(prompt):
        ids = tok([prompt], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        return enc(ids)[0][0]

    assert torch.allclose(ctx[0], direct("a photo of a square."), atol=1e-6)
    assert torch.allclose(ctx[1], direct(""), atol=1e-6)  # the unconditional branch: the empty prompt
    z = torch.randn(2, 4, 8, 8)
    out = model(z, torch.tensor([5, 5]), torch.tensor([0, 1]))
    assert out.shape == z.shape and not torch.allclose(out[0], model(z[:1], torch.tensor([5]), torch.tensor([1]))[0])
    with_prompts = load_latent_diffusion(tmp_path, class_prompts=["a photo of a circle.", "a photo of a square."])
    assert torch.allclose(with_prompts.conditioner(torch.tensor([1]))[0], ctx[0], atol=1e-6)


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(CfxError, match="diffusion.path=.*does not exist"):
        load_latent_diffusion(tmp_path / "nothing")
    (tmp_path / "vae").mkdir()
    with pytest.raises(CfxError, match="unet/, scheduler/ missing"):
        load_latent_diffusion(tmp_path)
    _common(tmp_path, 8)
    with pytest.raises(CfxError, match="no conditioner"):
        load_latent_diffusion(tmp_path)


def test_consensus_mask_by_angle():
    """Channel vectors at three positions: 30° (kept at 45°), 90° (dropped), a zero score (kept)."""
    implicit = torch.zeros(1, 2, 1, 3)
    implicit[0, 0] = 1.0  # (1, 0) everywhere
    score = torch.zeros(1, 2, 1, 3)
    score[0, :, 0, 0] = torch.tensor([math.cos(math.radians(30)), math.sin(math.radians(30))])
    score[0, :, 0, 1] = torch.tensor([0.0, 2.0])
    mask = consensus_mask(score, implicit, 45.0)
    assert mask.flatten().tolist() == [1.0, 0.0, 1.0]
    assert consensus_mask(score, implicit, 20.0).flatten().tolist() == [0.0, 0.0, 1.0]


def test_rescale_to_the_implicit_norm():
    v = torch.tensor([[3.0, 4.0]])          # norm 5
    to = torch.tensor([[0.0, 2.0]])         # norm 2
    assert torch.allclose(rescale(v, to), torch.tensor([[1.2, 1.6]]))
    assert torch.equal(rescale(torch.zeros(1, 2), to), torch.zeros(1, 2))


def test_ldm_grid_is_compvis_uniform_plus_one():
    from cfx_cli.diffusion.schedule import space_timesteps

    grid = space_timesteps(1000, "ldm500")
    assert grid[:3] == [1, 3, 5] and grid[-1] == 999 and len(grid) == 500
    assert space_timesteps(1000, "ldm50")[:2] == [1, 21]


