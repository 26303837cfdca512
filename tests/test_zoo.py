"""Each shipped model's quality on freshly rendered test-split images (the thresholds of the issue)."""
import json

import numpy as np
import torch

from cfx_cli import ZOO_DIR
from cfx_cli.data.synthetic import SyntheticWorld
from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.models.generative import load_diffusers_ddpm
from cfx_cli.models.explained import zoo_model
from cfx_cli.models.small_cnn import zoo_oracle
from cfx_cli.train import supervised

WORLD = SyntheticWorld(shapes=("circle", "square"))
SEED = 2026  # not the seed the models were measured with at training time


def test_shape_classifier_accuracy():
    q = supervised.evaluate_classifier(zoo_model(ZOO_DIR / "synthetic_shape", "classification"), WORLD, 1000, SEED)
    assert q["accuracy"] >= 0.98


def test_biased_classifier_learnt_the_background_shortcut():
    clean = supervised.evaluate_classifier(zoo_model(ZOO_DIR / "synthetic_shape", "classification"), WORLD, 1000, SEED)
    q = supervised.evaluate_classifier(zoo_model(ZOO_DIR / "synthetic_shape_biased", "classification"), WORLD, 1000,
                                       SEED)
    assert q["accuracy_bg_aligned"] >= 0.95
    assert q["accuracy_bg_conflict"] <= clean["accuracy_bg_conflict"] - 0.25


def test_robust_classifier_is_robust_and_its_gradients_point_at_the_shape():
    """PGD-trained (L2, ε = 0.5 in [0, 1] units): accuracy under a 20-step PGD attack of that budget
    far above the plain classifier's (measured 1.00 vs 0.57), and input gradients better aligned with
    the ideal shape change (cosine of −∇CE(other shape) with x_ideal − x: measured 0.35 vs 0.14)."""
    attack = {"norm": "l2", "eps": 0.5}
    plain = supervised.evaluate_classifier(zoo_model(ZOO_DIR / "synthetic_shape", "classification"), WORLD, 300, SEED,
                                           attack=attack)
    robust = supervised.evaluate_classifier(zoo_model(ZOO_DIR / "synthetic_shape_robust", "classification"), WORLD,
                                            300, SEED, attack=attack)
    assert robust["accuracy"] >= 0.98
    assert robust["robust_accuracy_l2_0.5"] >= 0.9 and robust["robust_accuracy_l2_0.5"] >= plain[
        "robust_accuracy_l2_0.5"] + 0.25
    assert robust["gradient_alignment"] >= 2 * plain["gradient_alignment"]


def test_pgd_attack_stays_in_its_ball_and_the_image_range():
    from cfx_cli.train.adversarial import pgd_attack

    model = zoo_model(ZOO_DIR / "synthetic_shape", "classification")
    f = WORLD.factors_for_indices("test", range(16), SEED)
    x, y = WORLD.render(f), torch.as_tensor(f["shape"]).long()
    for norm, eps in (("l2", 0.5), ("linf", 4 / 255)):
        x_adv = pgd_attack(model, x, y, norm, eps, steps=5, generator=torch.Generator().manual_seed(0))
        d = (x_adv - x) / 2  # in [0, 1] units
        size = d.flatten(1).norm(dim=1) if norm == "l2" else d.flatten(1).abs().amax(1)
        assert (size <= eps + 1e-5).all() and x_adv.min() >= -1 and x_adv.max() <= 1
        with torch.no_grad():  # and it is an attack: the loss goes up
            ce = torch.nn.functional.cross_entropy
            assert ce(model(x_adv), y) > ce(model(x), y)


def test_size_regressor_mae():
    q = supervised.evaluate_regressor(zoo_model(ZOO_DIR / "synthetic_size", "regression"), WORLD, 1000, SEED)
    assert q["mae"] <= 0.03  # labels are normalised: 0.03 of the size range


def test_oracle_reads_every_factor():
    world3 = SyntheticWorld(shapes=("circle", "square", "triangle"))
    q = supervised.evaluate_oracle(zoo_oracle(ZOO_DIR / "synthetic_oracle"), world3, 1000, SEED)
    for k in ("shape", "obj_colour", "bg_colour"):
        assert q[f"{k}_accuracy"] >= 0.98, (k, q)
    assert q["size_mae"] < 0.05 and q["pos_x_mae"] < 0.02 and q["pos_y_mae"] < 0.02


def test_every_shipped_model_records_how_it_was_made():
    for name in ("synthetic_shape", "synthetic_shape_biased", "synthetic_size", "synthetic_oracle"):
        info = json.loads((ZOO_DIR / name / "config.json").read_text())
        assert info["command"].startswith(f"cfx train {name}")
    info = json.loads((ZOO_DIR / "synthetic_ddpm" / "train_info.json").read_text())
    assert info["steps"] > 0 and info["command"].startswith("cfx train synthetic_ddpm")


@torch.no_grad()
def test_ddpm_samples_are_valid_images():
    """Unconditional samples (50 respaced steps) that the oracle reads as a circle or a square with
    confidence >= 0.9 on shape, object colour and background colour alike.

    The issue's gate is 90%. The shipped model (7000 steps of batch 256 on one H100, 5.3 min)
    measured 1.00 on 256 samples (50 steps); the earlier CPU-trained one (5200 steps of batch 64)
    reached 0.85, its misses tinted backgrounds.
    """
    ddpm = DDPMSampler(load_diffusers_ddpm(ZOO_DIR / "synthetic_ddpm"), 50)
    oracle = zoo_oracle(ZOO_DIR / "synthetic_oracle")
    read = oracle(ddpm.sample(64, (3, 32, 32), torch.Generator().manual_seed(0)).clamp(-1, 1))
    conf = torch.stack([read[k].softmax(1).amax(1) for k in ("shape", "obj_colour", "bg_colour")], 1)
    known_shape = torch.isin(read["shape"].argmax(1), torch.tensor(WORLD.shape_ids))
    valid = (conf >= 0.9).all(1) & known_shape
    assert valid.float().mean() >= 0.9, valid.float().mean()


@torch.no_grad()
def test_diffae_reconstructs_and_its_code_moves_the_factors_gradually():
    """The synthetic Diff-AE (`cfx train synthetic_diffae`): DDIM inversion (20 steps) + decoding (10), the
    Diff-AE-RE setting, reconstructs test images — mean |x − x̂| 0.032 of the range measured on 16 images
    (gate 0.05), the oracle reading the same object colour on all. The semantic code carries colours and
    size (shape stays in x_T): decoding image a's x_T with image b's code changes the images by 0.12 (3.8× the
    reconstruction error), and walking the code from a's to b's in five equal steps moves the image in
    several steps, not at once: per image the largest step is 0.64 of the whole change on average
    (measured on 8 pairs; 0.24 to 0.91: a discrete factor such as a colour switches within one step; gate
    0.75 on the mean)."""
    from cfx_cli.diffusion.sampler import DDIMSampler
    from cfx_cli.models.diffae import load_diffae

    m = load_diffae(ZOO_DIR / "synthetic_diffae")
    oracle = zoo_oracle(ZOO_DIR / "synthetic_oracle")
    x = WORLD.render(WORLD.sample(np.random.default_rng(7), 16))
    inv, ren = DDIMSampler(m, 20), DDIMSampler(m, 10)
    z = m.semantic(x)
    x_T = inv.invert(x, cond=z)

    def render(code, start=x_T):
        return ren.denoise(start, ren.num_steps - 1, -1, cond=code).clamp(-1, 1)

    rec = render(z)
    rec_err = float((rec - x).abs().mean() / 2)
    assert rec_err <= 0.05, rec_err
    assert (oracle(rec)["obj_colour"].argmax(1) == oracle(x)["obj_colour"].argmax(1)).all()
    swapped = render(z.roll(1, 0))
    assert float((swapped - rec).abs().mean() / 2) >= 2 * rec_err
    path = torch.stack([render((1 - a) * z[:8] + a * z.roll(1, 0)[:8], x_T[:8]) for a in torch.linspace(0, 1, 6)])
    steps = (path[1:] - path[:-1]).abs().mean((2, 3, 4))
    share = steps.max(0).values / (path[-1] - path[0]).abs().mean((1, 2, 3))
    assert share.mean() <= 0.75, share


@torch.no_grad()
def test_latent_diffusion_autoencoder_and_class_conditioning():
    """The synthetic LDM (`cfx train synthetic_ldm`): its autoencoder reconstructs test renders (mean
    |x − D(E(x))| 0.0044 of the range on 64 images; gate 0.02) with every factor the oracle reads kept,
    and 64 samples conditioned on a class (50 DDIM steps, the conditional ε alone) show that class's shape
    (measured 1.00, 91% of the samples valid for the oracle; gate 0.9)."""
    from cfx_cli.diffusion.sampler import DDIMSampler
    from cfx_cli.models.latent import load_latent_diffusion

    m = load_latent_diffusion(ZOO_DIR / "synthetic_ldm")
    oracle = zoo_oracle(ZOO_DIR / "synthetic_oracle")
    x = WORLD.render(WORLD.sample(np.random.default_rng(7), 64))
    rec = m.decode(m.encode(x)).clamp(-1, 1)
    assert float((rec - x).abs().mean() / 2) <= 0.02
    read, read_rec = oracle(x), oracle(rec)
    for k in ("shape", "obj_colour", "bg_colour"):
        assert (read[k].argmax(1) == read_rec[k].argmax(1)).all(), k
    y = torch.arange(64) % 2
    z = DDIMSampler(m, 50).sample(64, m.latent_shape, torch.Generator().manual_seed(0), cond=y)
    shape = oracle(m.decode(z).clamp(-1, 1))["shape"].argmax(1)
    assert (shape == torch.tensor(WORLD.shape_ids)[y]).float().mean() >= 0.9
