"""MaskDiME against the official code (github.com/clguo/MaskDiME), step for step.

The fixture (tests/fixtures/parity/maskdime/maskdime.json says how it was made) is the official main.py batch
loop with --method maskdime (get_MaskDiME_sampling_CelebA, compute_grad_masks_nested2) and test.sh's MaskDiME
flags (grad_scale 8, topk_ratio 0.05, x_t_rate 0.5, blur_kernel 5, blur_sigma 3, per_channel False, grads_clip
False, λ_1 = 0.05, λ_p = 30 on VGG19 features[:18], use_logits) on the tiny random ADM of tests/fixtures/adm
(T = 500 respaced to 20, learned sigma), a small random 40-logit classifier (query 31), seeded random VGG19
weights, τ = 5 and scales [8, 12]: scale 8 flips one image of three, scale 12 re-runs the other two from the
same noisy image and flips one more; the third is never flipped.

cfx runs the same weights on the official code's recorded noise (a NoiseBank) with the public code's switches,
which are MaskDiME's defaults: public_code_offset (noise to τ, denoise from τ − 1), no step noise inside the
mask (step_noise=false) and the last step's keep-noise q_sample(x, 0) outside it (public_last_noise=true).
It must give, at every step of every pass, the same z, the same gradient point x̂, the same two masks, and in
the end the same counterfactuals, masks, success decisions and call counts.

The official run had torch.clamp's backward of the environment the code releases (maskdimeenv.yaml: torch 2.2.2,
gradient passing at ±1), as cfx's VGG term (perceptual.clamp_passing_bounds); see the last test.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import cfx_cli.methods.maskdime as maskdime_module
from cfx_cli.methods.base import NoiseBank, SampleRNG
from cfx_cli.methods.maskdime import MaskDiME
from test_parity_dime import ROOT, TOL, check_result, parts

FIX = ROOT / "parity" / "maskdime"
# what the fixture exercises: image 1 flips at scale 8, image 0 at scale 12 (the retry), image 2 never
EXPECTED = ([True, True, False], [12.0, 8.0, 12.0])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture():
    return load_file(str(FIX / "maskdime.safetensors")), json.loads((FIX / "maskdime.json").read_text())


def bank(fx, meta, n):
    """The official draws in order, each spread to its batch rows. Unlike DiME / FastDiME nothing is dropped:
    MaskDiME's draws are q_sample's, and the last step's q_sample(x, 0) outside the mask is kept."""
    draws = []
    for i, d in enumerate(meta["draws"]):
        full = torch.zeros(n, *fx[f"noise.{i:03d}"].shape[1:])
        full[d["rows"]] = fx[f"noise.{i:03d}"]
        draws.append(full)
    return NoiseBank(draws)


def maskdime(fx, meta, tmp_path, **switches):
    s = meta["settings"]
    sampler, model, objective, meter, vgg = parts(fx, meta, tmp_path)
    method = MaskDiME(sampler, model, objective, tau=s["start_step"],
                      scales=[float(v) for v in s["classifier_scales"].split(",")], lambda_l1=s["l1_loss"],
                      lambda_perc=s["l_perc"], perceptual_weights=str(vgg), grad_scale=s["grad_scale"],
                      mask_ratio=s["topk_ratio"], inner_ratio=s["x_t_rate"], mask_dilation=s["blur_kernel"],
                      classifier_loss="logit", **switches)
    return method, model, objective, meter


def run(method, fx, meta, model, objective, meter, monkeypatch):
    """cfx's explain on the recorded draws; per step (in order) the z given to the UNet, the gradient point
    x̂ and the two masks."""
    x, n = fx["x"], fx["x"].shape[0]
    with torch.no_grad():
        target = objective.target(model(x))  # meter not started: not counted, as the runner's first call
    assert torch.equal(target, fx["target"])
    steps = []
    predict, loss_gradient, dual_mask = method.sampler.predict, maskdime_module.loss_gradient, maskdime_module.dual_mask

    def rec_predict(z, t, *a, **k):
        steps.append({"t": t, "z": z.clone()})
        return predict(z, t, *a, **k)

    def rec_gradient(model_, objective_, x_hat, *a, **k):
        steps[-1]["x_hat"] = x_hat.clone()
        return loss_gradient(model_, objective_, x_hat, *a, **k)

    def rec_mask(*a, **k):
        steps[-1]["masks"] = dual_mask(*a, **k)
        return steps[-1]["masks"]

    monkeypatch.setattr(method.sampler, "predict", rec_predict)
    monkeypatch.setattr(maskdime_module, "loss_gradient", rec_gradient)
    monkeypatch.setattr(maskdime_module, "dual_mask", rec_mask)
    noise = bank(fx, meta, n)
    meter.start(n)
    result = method.explain(x, target, SampleRNG(0, range(n), meter=meter, source=noise))
    counts = meter.stop()
    with torch.no_grad():
        success = objective.success(model(result.x_cf), target)
    return result, success, counts, steps, noise


def test_maskdime_matches_the_official_code(fixture, tmp_path, monkeypatch):
    fx, meta = fixture
    method, model, objective, meter = maskdime(fx, meta, tmp_path)
    assert (method.start, method.step_noise, method.public_last_noise) == (5, False, True)  # the defaults
    result, success, counts, steps, noise = run(method, fx, meta, model, objective, meter, monkeypatch)
    assert noise.remaining == 0  # every official draw used, in order, and no other
    assert (fx["success"].tolist(), fx["scale_used"].tolist()) == EXPECTED
    check_result(result, success, counts, fx)
    torch.testing.assert_close(result.extras["mask"], fx["mask"], rtol=0, atol=0)
    tau = meta["settings"]["start_step"]
    assert len(steps) == tau * len(meta["passes"])
    for p, info in enumerate(meta["passes"]):
        for k, t in enumerate(info["steps"]):
            step = steps[p * tau + k]
            assert step["t"] == t and step["z"].shape[0] == len(info["rows"])
            torch.testing.assert_close(step["z"], fx[f"pass{p}.z_t{t}"], **TOL)
            torch.testing.assert_close(step["x_hat"], fx[f"pass{p}.x_hat_t{t}"], **TOL)
            outer, inner = step["masks"]  # exact: the k-th and (k+1)-th largest |∇| differ by ≥ 4e-4 relative
            assert torch.equal(outer, fx[f"pass{p}.mask_out_t{t}"].to(outer.dtype)), (p, t)
            assert torch.equal(inner, fx[f"pass{p}.mask_in_t{t}"].to(inner.dtype)), (p, t)
    assert counts["unet"]["forward"].tolist() == [2 * tau, tau, 2 * tau]  # τ UNet calls a pass


def test_the_clamp_of_the_perceptual_term_matters(fixture, tmp_path, monkeypatch):
    """The fixture's official run had torch 2.2.2's clamp (the version the released maskdimeenv.yaml pins): its
    gradient passes at x = ±1, where the masked clean estimate sits wherever clip_denoised clipped x̂₀. Run with
    a clamp that passes none there (torch 2.14's, the official code as-is on this machine), the counterfactuals
    move far beyond rounding: cfx keeps the released environment's clamp (perceptual.clamp_passing_bounds)."""
    import cfx_cli.models.perceptual as perceptual

    fx, meta = fixture
    monkeypatch.setattr(perceptual, "clamp_passing_bounds", lambda x: torch.where((x > -1) & (x < 1), x, x.detach().clamp(-1, 1)))
    method, model, objective, meter = maskdime(fx, meta, tmp_path)
    result, _, _, _, _ = run(method, fx, meta, model, objective, meter, monkeypatch)
    assert (result.x_cf - fx["x_cf"]).abs().max() > 0.1
