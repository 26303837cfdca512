"""FastDiME against the official code (github.com/ppegiosk/FastDiME_CelebA), variant by variant.

The fixtures (tests/fixtures/parity/fastdime/<variant>.json say how each was made) are the official main.py
batch loop with --method fastdime | fastdime2 | fastdime2+ | fastdimenomask (get_FastDiME_iterative_sampling;
the 2-step variants: main.py's generate_mask of the first pass's counterfactual, then a second pass with that
fixed mask), on the tiny random ADM of tests/fixtures/adm (T = 500 respaced to 20, learned sigma), a small
random 40-logit classifier (query 31), seeded random VGG19 features[:18] (λ_p = 30), λ_1 = 0.05, use_logits,
τ = 5, warmup (mask start) 2, dilation 5, threshold 0.15, no 1/√ᾱ_t (scale_grads False, as run_fastdime.sh),
scales [8, 12] (images not flipped by 8 re-run with 12 from the same noisy image).

cfx runs the same weights on the recorded noise with the public code's switches: public_code_offset (noise to
τ, denoise from τ − 1), public_mask_noise (outside the mask keep q_sample(x, t), t the level before the step)
and public_x_hat_lag (the gradient of step i at the clean estimate of step i − 1, x at the first step), and must
give the same counterfactuals, masks, states, success decisions and call counts.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from cfx_cli.methods.fastdime import FastDiME
from test_parity_dime import ROOT, TOL, check_result, parts, run

FIX = ROOT / "parity" / "fastdime"
VARIANTS = {"mask": "mask", "2": "2", "2plus": "2+", "nomask": "nomask"}
# what the fixtures exercise: which images flip at which scale (a retry in every variant)
EXPECTED = {"mask": ([True, False, False], [8.0, 12.0, 12.0]),
            "2": ([True, False, False], [12.0, 12.0, 12.0]),
            "2plus": ([True, False, True], [12.0, 12.0, 8.0]),
            "nomask": ([True, False, True], [8.0, 12.0, 12.0])}

pytestmark = pytest.mark.usefixtures("one_thread")


def fastdime(name, fx, meta, tmp_path, **switches):
    s = meta["settings"]
    sampler, model, objective, meter, vgg = parts(fx, meta, tmp_path)
    method = FastDiME(sampler, model, objective, variant=VARIANTS[name], tau=s["start_step"],
                      scales=[float(v) for v in s["classifier_scales"].split(",")], lambda_l1=s["l1_loss"],
                      lambda_perc=s["l_perc"], perceptual_weights=str(vgg), rescale_sqrt_alpha=s["scale_grads"],
                      mask_start=s["warmup_step"], mask_dilation=s["dilation"], mask_threshold=s["masking_threshold"],
                      classifier_loss="logit", **switches)
    return method, model, objective, meter


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fastdime_matches_the_official_code(name, tmp_path):
    fx, meta = load_file(str(FIX / f"{name}.safetensors")), json.loads((FIX / f"{name}.json").read_text())
    method, model, objective, meter = fastdime(name, fx, meta, tmp_path, public_code_offset=True,
                                               public_mask_noise=True, public_x_hat_lag=True)
    result, success, counts, seen = run(method, fx, meta, model, objective, meter)
    assert (fx["success"].tolist(), fx["scale_used"].tolist()) == EXPECTED[name]
    check_result(result, success, counts, fx)
    if name == "nomask":
        assert "mask" not in result.extras
    else:
        assert torch.equal(result.extras["mask"], fx["mask"])
    tau = meta["settings"]["start_step"]
    assert len(seen) == tau * len(meta["passes"])
    for p, info in enumerate(meta["passes"]):
        x_hat, z = seen[p * tau + 1]  # z after the first guided step (and blend), x̂ of the second gradient
        torch.testing.assert_close(z, fx[f"pass{p}.z_1"], **TOL)
        torch.testing.assert_close(x_hat, fx[f"pass{p}.x_hat_1"], **TOL)
        assert x_hat.shape[0] == len(info["rows"])
    passes = 2 if name in ("2", "2plus") else 1
    assert counts["unet"]["forward"].max() == 2 * passes * tau  # τ UNet calls a pass, two scales at most


def test_fastdime_default_takes_the_gradient_at_the_current_estimate(tmp_path):
    """cfx's default (public_x_hat_lag=false) takes step i's gradient at x̂(z_t) of step i, not at the
    estimate of the step before: its first gradient is at x̂(z_τ) (the public code's: at x), and the
    counterfactual differs from the public code's."""
    fx, meta = load_file(str(FIX / "nomask.safetensors")), json.loads((FIX / "nomask.json").read_text())
    method, model, objective, meter = fastdime("nomask", fx, meta, tmp_path)
    assert method.public_x_hat_lag is False
    result, _, _, seen = run(method, fx, meta, model, objective, meter, whole_bank=False)
    assert not torch.equal(seen[0][0], fx["x"])
    assert (result.x_cf - fx["x_cf"]).abs().max() > 1e-3
