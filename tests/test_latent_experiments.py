"""The latent-space paper experiments end to end on tiny files in the released formats, written here:
CelebA-HQ (CelebAMask-HQ layout) and an ImageNet validation folder; a small LDM in cin256-v2's Lightning
layout, a small text-conditional Stable-Diffusion folder, a small DiffAE Lightning checkpoint, ACE's ADM
layout; STEEX's classifier and the regression paper's Lightning regressor. The experiment configs compose
as users run them; only paths, the small models' architecture and the length of the runs are overridden."""
import json

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from cfx_cli.models.diffae_beatgans import FFHQ256_AUTOENC
from torchvision.models import densenet121
from cfx_cli.outputs import read_samples
from test_celeba_experiments import FIXTURES as ADM_FIXTURES, tiny_adm_overrides
from test_celebahq import write_celebahq
from test_diffae_checkpoint import SMALL as DIFFAE_SMALL, _random_model, _save_lightning_ckpt
from test_imagenet import random_resnet50, write_val
from test_latent import _common, _tiny_clip
from test_ldm_checkpoint import FIX, SMALL_UNET, SMALL_VQ, ldm_weights, schedule_buffers, write_lightning_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latent_experiments")
    mp = pytest.MonkeyPatch()
    write_celebahq(tmp / "celebahq", size=40)
    write_val(tmp / "val")
    torch.save(random_resnet50(1).state_dict(), tmp / "resnet50.pth")
    # STEEX's DecisionDensenet (3 outputs), under model_state_dict
    torch.manual_seed(0)
    steex = densenet121(num_classes=3)
    sd = {f"feat_extract.feat_extract.{k}": v for k, v in steex.state_dict().items() if k.startswith("features.")}
    sd.update({k: v for k, v in steex.state_dict().items() if k.startswith("classifier.")})
    torch.save({"epoch": 1, "model_state_dict": sd}, tmp / "checkpoint.tar")
    # the regression paper's age regressor (Lightning): DenseNet features + Linear(1024, 1), Normalizer(0.5)
    reg = densenet121(num_classes=1)
    state = {"model.mu": torch.full((1, 3, 1, 1), 0.5), "model.sigma": torch.full((1, 3, 1, 1), 0.5)}
    state.update({f"model.classifier.0.feat_extract.{k}": v for k, v in reg.state_dict().items()
                  if k.startswith("features.")})
    state.update({f"model.classifier.1.{k[len('classifier.'):]}": v for k, v in reg.state_dict().items()
                  if k.startswith("classifier.")})
    write_lightning_ckpt(tmp / "regressor.ckpt", state, mp)
    # a small LDM in cin256-v2's layout with ImageNet's 1000 classes + the null class
    from safetensors import safe_open

    with safe_open(str(FIX / "ldm_tiny_parity.safetensors"), "pt") as f:
        layout = json.loads(f.metadata()["layout"])
    layout["cond_stage_model.embedding.weight"] = [1001, SMALL_UNET["cross_attention_dim"]]
    write_lightning_ckpt(tmp / "cin.ckpt", {**schedule_buffers(), **ldm_weights(layout)}, mp)
    # a small text-conditional Stable-Diffusion folder (16x16 images, 8x8x4 latents)
    sd_dir = tmp / "sd"
    sd_dir.mkdir()
    _common(sd_dir, 16)
    _tiny_clip(sd_dir, ["a photo of a non-smiling person", "a photo of a smiling person"]
               + [f"a photo of a {c}." for c in ("tench", "goldfish", "great white shark", "tiger shark")])
    # a small DiffAE in the official layout
    _save_lightning_ckpt(tmp / "diffae.ckpt", mp, _random_model(0), _random_model(1))
    mp.undo()
    return tmp


def run(compose, overrides, job_dir, edit=None):
    from cfx_cli.job.loop import job

    cfg = compose(overrides)
    if edit:
        with open_dict(cfg):
            edit(cfg)
    job(cfg, job_dir)
    assert json.loads((job_dir / "status.json").read_text())["state"] == "done"
    return cfg, read_samples(job_dir).sort_values("index")


def test_ldce_imagenet_cls(tmp_path, compose, files):
    def small_ldm(cfg):
        cfg.diffusion.unet_config = dict(SMALL_UNET)
        cfg.diffusion.vq_config = dict(SMALL_VQ)

    cfg, s = run(compose, ["experiment=ldce_imagenet_cls", f"dataset.root={files / 'val'}",
                           f"diffusion.path={files / 'cin.ckpt'}", f"classifier.path={files / 'resnet50.pth'}",
                           "classifier.input_size=24", "dataset.image_size=32", "dataset.num_images=2", "batch_size=2",
                           "sampler.steps=20", "device=cpu"], tmp_path / "job", small_ldm)
    assert (cfg.method.strength, cfg.method.lambda_c, cfg.method.lambda_d, cfg.method.angle, cfg.method.scale) == \
        (0.382, 2.3, 0.3, 45.0, 3.0)
    assert cfg.sampler._target_.endswith("DDIMSampler") and cfg.classifier.interpolation == "center_crop"
    # t_enc = floor(0.382 · 20) = 7 steps; each: ε_u and ε_c in one call (2 evaluations), two backward passes
    assert (s["nfe_unet"] == 7 * 2).all() and (s["nfe_unet_backward"] == 7 * 2 * 2).all()
    assert (s["nfe_model"] == 7).all() and s["consensus_kept"].between(0, 1).all()
    # the decoder: once per step with two backward passes (classifier, distance), once for the output
    assert (s["nfe_decoder"] == 7 + 1).all() and (s["nfe_decoder_backward"] == 7 * 2).all()
    table = {r.source: r.target for r in __import__("pandas").read_csv(
        __import__("cfx_cli").__path__[0] + "/data/imagenet_targets.csv").itertuples()}
    assert all(table[p] == t for p, t in zip(s["pred"], s["target"]))


def test_ldce_imagenet_txt(tmp_path, compose, files):
    cfg, s = run(compose, ["experiment=ldce_imagenet_txt", f"dataset.root={files / 'val'}",
                           f"diffusion.path={files / 'sd'}", f"classifier.path={files / 'resnet50.pth'}",
                           "classifier.input_size=12", "dataset.image_size=16", "dataset.num_images=2",
                           "batch_size=2", "sampler.steps=20", "device=cpu"], tmp_path / "job")
    assert (cfg.method.lambda_c, cfg.method.lambda_d, cfg.method.angle) == (3.95, 1.2, 50.0)
    assert cfg.diffusion.prompt == "a photo of a {}." and len(s) == 2 and (s["nfe_unet"] == 14).all()


def test_ldce_celebahq(tmp_path, compose, files):
    cfg, s = run(compose, ["experiment=ldce_celebahq", f"dataset.root={files / 'celebahq'}",
                           f"diffusion.path={files / 'sd'}", f"classifier.path={files / 'checkpoint.tar'}",
                           "classifier.input_size=64", "dataset.image_size=16", "batch_size=3",
                           "sampler.steps=10", "device=cpu"], tmp_path / "job")
    assert (cfg.method.strength, cfg.method.lambda_c, cfg.method.lambda_d, cfg.method.angle) == (0.502, 4.0, 3.3, 55.0)
    assert list(cfg.diffusion.class_prompts) == ["a photo of a non-smiling person", "a photo of a smiling person"]
    assert s["id"].tolist() == ["1.jpg", "2.jpg", "4.jpg"]          # the test split
    assert s["label"].tolist() == [0, 1, 1]                         # Smiling, STEEX's output 1
    assert (s["nfe_unet"] == 5 * 2).all()


def test_diffae_re_celebahq_age(tmp_path, compose, files):
    def small_diffae(cfg):
        for k, v in DIFFAE_SMALL.items():
            if v != FFHQ256_AUTOENC.get(k):
                cfg.diffusion[k] = list(v) if isinstance(v, tuple) else v

    cfg, s = run(compose, ["experiment=diffae_re_celebahq_age", f"dataset.root={files / 'celebahq'}",
                           f"diffusion.path={files / 'diffae.ckpt'}", f"regressor.path={files / 'regressor.ckpt'}",
                           "+regressor.input_size=64", "dataset.image_size=32", "batch_size=3", "sampler.steps=3",
                           "method.inversion_steps=3", "method.iterations=2", "device=cpu"], tmp_path / "job",
                 small_diffae)
    assert (cfg.method.lr, cfg.method.iterations, cfg.method.lambda_z, cfg.sampler.steps) == (0.002, 2, 0.0, 3)
    assert OmegaConf.to_container(cfg.target)["label_values"] == [0.1, 0.8] and cfg.target.tolerance == 0.05
    assert s["id"].tolist() == ["1.jpg", "2.jpg", "4.jpg"]
    assert s["target"].tolist() == [0.8, 0.1, 0.8]                 # Young: 1, 0, 1 → age 80, 10, 80
    assert (s["iterations"] <= 2).all()
    for kind in ("reconstruction", "heatmap"):
        assert len(list((tmp_path / "job" / "images" / kind).glob("*.png"))) == 3


def test_ace_re_celebahq_age(tmp_path, compose, files):
    cfg, s = run(compose, ["experiment=ace_re_celebahq_age", f"dataset.root={files / 'celebahq'}",
                           f"diffusion.path={ADM_FIXTURES / 'tiny_adm_celeba_format.pt'}", *tiny_adm_overrides(),
                           f"regressor.path={files / 'regressor.ckpt'}", "+regressor.input_size=64",
                           "dataset.image_size=32", "batch_size=3", "sampler.steps=10", "method.tau=2",
                           "method.iterations=2", "device=cpu"], tmp_path / "job")
    assert (cfg.method.step, cfg.method.lambda_l1, cfg.method.mask_dilation, cfg.method.early_stop) == \
        (1.0, 0.0, 15, True)
    assert (s["pgd_iterations"] <= 2).all() and set(s["target"]) <= {0.1, 0.8}
