"""Each shipped model's quality on freshly rendered test-split images (the thresholds of the issue)."""
import json

import numpy as np
import pytest
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
