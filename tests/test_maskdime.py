"""MaskDiME: its guided steps computed by hand, its dual mask against the public code's blur, and the method
end to end (the shipped synthetic models, `cfx run`, the CelebA experiments on tiny real-format files).

The hand computations reuse test_guidance's stubs and tables (a fixed-ε network on a 10-step linear β,
ᾱ and the posterior re-derived there in float64) with a quadratic classifier, so that the classifier's
gradient, and so the mask, moves with the clean estimate x̂ from one step to the next. Expected values
come from the formulas of cfx_cli/methods/maskdime.py's docstring alone — the masks from a sort and
shifts, never from the method's helpers — with the noise reproduced from a twin SampleRNG in the
documented order: q_sample's draw, then per step the step noise (step_noise, t > 0) and the keep-noise
outside the mask (unless the last step keeps x itself).
"""
import json
import math

from omegaconf import OmegaConf

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import SampleRNG
from cfx_cli.methods.maskdime import MaskDiME, dual_mask
from cfx_cli.objectives import ClassificationObjective
from cfx_cli import CONF_DIR
from conftest import cfx
from test_celeba_experiments import FIXTURES, files, tiny_adm_overrides  # noqa: F401  (files: a fixture)
from test_defaults_real import DIME_IDEAL_CF_L1, _job
from test_guidance import ABAR, ATOL, BETAS, C, H, POST_VAR, SEED, W, Y, draws, post_mean, q, run, setup, x0_hat
from test_methods import Explained, images, parts  # noqa: F401  (parts: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

VAR_LARGE = [POST_VAR[1]] + BETAS[1:]  # guided-diffusion's fixed_large: Σ_0 = the posterior variance at t = 1


class QuadraticClassifier(nn.Module):
    """f_k(x) = Σ V_k ⊙ x²: with L = −f_{y*} ('logit') the gradient is −2 V_{y*} ⊙ x, so its magnitude, and
    the masks drawn from it, follow x̂."""

    task = "classification"

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.V = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
        self.num_classes = 2

    def forward(self, x):
        return (self.V.unsqueeze(0) * x.unsqueeze(1) ** 2).flatten(2).sum(2)

    def grad(self, x, y):
        return -2 * self.V[y] * x


def top(a, k):
    """1 where a (N×H×W) holds one of its k largest values, per image (by a sort; no ties here)."""
    kth = a.flatten(1).sort(1, descending=True).values[:, k - 1]
    return (a >= kth.view(-1, 1, 1)).double().unsqueeze(1)


def dilate(m, k):
    """A k×k dilation by shifts (zero outside the image)."""
    out, r = m.clone(), k // 2
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = torch.zeros_like(m)
            ys, yd = (slice(dy, None), slice(None, -dy or None)) if dy >= 0 else (slice(None, dy), slice(-dy, None))
            xs, xd = (slice(dx, None), slice(None, -dx or None)) if dx >= 0 else (slice(None, dx), slice(-dx, None))
            shifted[..., yd, xd] = m[..., ys, xs]
            out = torch.maximum(out, shifted)
    return out


def hand_dual(g, k_out, k_in, k=1):
    a = g.abs().mean(1)
    return dilate(top(a, k_out), k), dilate(top(a, k_in), k)


def maskdime(sampler, clf, **kw):
    args = dict(tau=2, scales=[3.0], lambda_l1=0.05, lambda_perc=0, grad_scale=2.0, mask_ratio=0.25,
                inner_ratio=0.5, mask_dilation=1, classifier_loss="logit")
    return MaskDiME(sampler, clf, ClassificationObjective(), **{**args, **kw})


# ------------------------------------------------------------------------------- by hand
def test_two_steps_by_hand_public_code():
    """τ = 2, fixed_large (so the guidance shows at t = 0 too), the public code's settings: no σ_t ε inside
    the mask, q_sample(x, t) outside it at every step, the last included. 16 pixels, κ = 1/4, ρ = 1/2:
    M_out holds the 4 pixels of largest mean_c |g_c|, M_in the 2 largest.

        z  = q(x, τ, ε₀)
        t = 1: x̂ = x;  g_c = s ∇L(x)/√ᾱ₁;  (O₁, I₁) = masks(g_c)
               z₁ = O₁ [μ₁(z) − Σ₁ γ (g_c + λ₁ sign(z − x))] + (1 − O₁) q(x, 1, n₁)
        t = 0: x̂ = I₁ x̂₀(z₁) + (1 − I₁) x;  g_c = s ∇L(x̂)/√ᾱ₀;  (O₀, I₀) = masks(g_c)
               z₀ = O₀ [μ₀(z₁) − Σ₀ γ (g_c + λ₁ sign(z₁ − x))] + (1 − O₀) q(x, 0, n₀)
    """
    s, lam, gamma = 3.0, 0.05, 2.0
    x, diffusion, sampler, _ = setup(variance="fixed_large", seed=6)
    clf = QuadraticClassifier(seed=6)
    res = maskdime(sampler, clf).explain(x, Y, SampleRNG(SEED, [3, 11]))

    e0, n1, n0 = draws(3)
    c = diffusion.eps
    z = q(x, 2, e0)
    gc = s * clf.grad(x, Y) / math.sqrt(ABAR[1])
    o1, i1 = hand_dual(gc, 4, 2)
    z1 = post_mean(z, 1, c) - VAR_LARGE[1] * gamma * (gc + lam * torch.sign(z - x))
    z1 = o1 * z1 + (1 - o1) * q(x, 1, n1)
    xh = i1 * x0_hat(z1, 0, c) + (1 - i1) * x
    gc = s * clf.grad(xh, Y) / math.sqrt(ABAR[0])
    o0, i0 = hand_dual(gc, 4, 2)
    z0 = post_mean(z1, 0, c) - VAR_LARGE[0] * gamma * (gc + lam * torch.sign(z1 - x))
    z0 = o0 * z0 + (1 - o0) * q(x, 0, n0)

    torch.testing.assert_close(res.x_cf, z0, rtol=0, atol=ATOL)
    assert torch.equal(res.extras["mask"], o0)  # the last step's outer mask is the one saved
    # one UNet call a step, fed z at level τ (told level 1), then z₁
    assert [t for _, t in diffusion.calls] == [[1, 1], [0, 0]]
    torch.testing.assert_close(diffusion.calls[1][0], z1, rtol=0, atol=ATOL)
    # the premises: the masks moved with x̂ between the steps, and I ⊂ O with the counts asked for
    assert not torch.equal(o1, o0)
    assert o1.sum((1, 2, 3)).tolist() == [4, 4] and i1.sum((1, 2, 3)).tolist() == [2, 2] and (i1 <= o1).all()
    # outside the mask the last step kept a (faint) noisy x, not x itself
    outside = (1 - o0).expand_as(x).bool()
    assert (res.x_cf[outside] - x[outside]).abs().max() > 1e-3


def test_step_noise_and_a_clean_last_step_by_hand():
    """step_noise adds √Σ_t ε_t inside the mask when t > 0 (drawn before the keep-noise);
    public_last_noise=false keeps x itself outside the last mask (no draw at t = 0)."""
    s, lam, gamma = 3.0, 0.05, 2.0
    x, diffusion, sampler, _ = setup(variance="fixed_large", seed=7)
    clf = QuadraticClassifier(seed=7)
    res = maskdime(sampler, clf, step_noise=True, public_last_noise=False).explain(x, Y, SampleRNG(SEED, [3, 11]))

    e0, e1, n1 = draws(3)
    c = diffusion.eps
    z = q(x, 2, e0)
    gc = s * clf.grad(x, Y) / math.sqrt(ABAR[1])
    o1, i1 = hand_dual(gc, 4, 2)
    z1 = post_mean(z, 1, c) - VAR_LARGE[1] * gamma * (gc + lam * torch.sign(z - x)) + math.sqrt(VAR_LARGE[1]) * e1
    z1 = o1 * z1 + (1 - o1) * q(x, 1, n1)
    xh = i1 * x0_hat(z1, 0, c) + (1 - i1) * x
    gc = s * clf.grad(xh, Y) / math.sqrt(ABAR[0])
    o0, _ = hand_dual(gc, 4, 2)
    z0 = o0 * (post_mean(z1, 0, c) - VAR_LARGE[0] * gamma * (gc + lam * torch.sign(z1 - x))) + (1 - o0) * x

    torch.testing.assert_close(res.x_cf, z0, rtol=0, atol=ATOL)
    outside = (1 - o0).expand_as(x).bool()
    assert torch.equal(res.x_cf[outside], x[outside])


def test_guidance_raises_the_target_logit_inside_the_mask():
    """The sign, at the paper's loss (logit): against γ = 0 (same noise), the guided counterfactual has the
    higher target logit."""
    x, _, sampler, _ = setup(variance="fixed_large", seed=8)
    clf = QuadraticClassifier(seed=8)
    guided = run(maskdime(sampler, clf, tau=3), x, Y)
    plain = run(maskdime(sampler, clf, tau=3, grad_scale=0.0), x, Y)
    f = lambda v: clf(v).gather(1, Y.view(-1, 1)).squeeze(1)  # noqa: E731
    assert (f(guided) > f(plain) + 1e-3).all()


# ------------------------------------------------------------------------------- the dual mask
def public_blur_mask(m, k, sigma=3.0):
    """The public code's dilation, re-derived: torchvision's gaussian_blur (reflect padding, a separable
    normalised Gaussian of size k) of a {0,1} mask, thresholded at > 0."""
    r = k // 2
    w = torch.exp(-((torch.arange(k, dtype=torch.float64) - r) ** 2) / (2 * sigma**2))
    w = (w / w.sum()).to(m.dtype)
    c = m.shape[1]
    out = F.pad(m, (r, r, r, r), mode="reflect")
    out = F.conv2d(out, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    out = F.conv2d(out, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return (out > 0).to(m.dtype)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_dual_mask_is_the_public_codes_nested_top_k_and_blur(k):
    """M_out: the ⌊κ·HW⌋ largest channel-mean magnitudes, M_in: the ⌊ρ·⌊κ·HW⌋⌋ largest, each dilated; the
    dilation by max-pooling equals the public code's Gaussian blur > 0, at the borders too."""
    g = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(k))
    g[0, :, 0, 0] = 50.0  # a corner pixel among the largest: the reflect padding must add nothing
    out, inn = dual_mask(g, 0.05, 0.5, k)
    a = g.abs().mean(1)
    k_out, k_in = int(0.05 * 256), int(0.5 * int(0.05 * 256))  # 12 and 6
    want_out, want_in = top(a, k_out), top(a, k_in)
    assert torch.equal(out, public_blur_mask(want_out, k)) and torch.equal(inn, public_blur_mask(want_in, k))
    assert torch.equal(out, dilate(want_out, k))
    assert (inn <= out).all() and out[0, 0, 0, 0] == 1
    # without dilation the counts are exactly k_out and k_in; at least one pixel each however small κ, ρ
    o1, i1 = dual_mask(g, 0.05, 0.5, 1)
    assert o1.sum((1, 2, 3)).tolist() == [k_out] * 3 and i1.sum((1, 2, 3)).tolist() == [k_in] * 3
    o1, i1 = dual_mask(g, 1e-6, 1e-6, 1)
    assert o1.sum((1, 2, 3)).tolist() == [1] * 3 and torch.equal(o1, i1)


@pytest.mark.parametrize("override,match", [
    ({"mask_ratio": 0.0}, r"method.mask_ratio=0.0 must lie in \(0, 1\]"),
    ({"inner_ratio": 1.5}, r"method.inner_ratio=1.5 must lie in \(0, 1\]"),
    ({"mask_dilation": 4}, r"method.mask_dilation=4 must be odd"),
    ({"grad_scale": float("nan")}, r"method.grad_scale=nan must be a finite number"),
    ({"tau": 50}, r"method.tau=50 must lie in 1..10"),
])
def test_bad_settings_are_one_line(override, match):
    _, _, sampler, _ = setup()
    with pytest.raises(CfxError, match=match):
        maskdime(sampler, QuadraticClassifier(), **override)


def test_refuses_another_sampler():
    from types import SimpleNamespace

    with pytest.raises(CfxError, match="method=maskdime guides the DDPM posterior mean .*use sampler=ddpm .got "
                                       "sampler=ddim"):
        MaskDiME(SimpleNamespace(kind="ddim", num_steps=10), None, None)


# ------------------------------------------------------------------------------- the shipped models
def test_flips_the_shipped_classifier_at_its_cost(parts):
    """The tuned MaskDiME (conf/tuning/maskdime_synthetic_ddpm.yaml, as `cfx run method=maskdime` composes it) flips
    the shipped classifier with small edits. Cost per image: one UNet forward a guided step and scale tried, never
    differentiated; one classifier forward and backward a step, and a forward to judge each scale."""
    cfg, p = parts("method=maskdime")
    x, idx = images(p, 8)
    res = Explained(p, x, idx)
    assert res.success.float().mean() >= 0.75
    assert (res.x_cf - x).abs().mean() / 2 < 0.05
    tau, scales = cfg.method.tau, torch.tensor(list(cfg.method.scales))
    tried = (res.info["scale"].unsqueeze(1) >= scales).sum(1)
    assert torch.equal(res.unet["forward"], tau * tried) and not res.unet["backward"].any()
    assert torch.equal(res.model["forward"], (tau + 1) * tried)
    assert torch.equal(res.model["backward"], tau * tried)
    mask = res.extras["mask"]
    assert mask.shape == (8, 1, *x.shape[2:]) and set(mask.unique().tolist()) <= {0.0, 1.0}
    # the edit lies in the saved (last) mask, the rest is x itself (the tuning's clean last step)
    assert torch.equal((res.x_cf * (1 - mask)), (x * (1 - mask)))


def test_same_image_whatever_the_batch(parts):
    """Per-sample noise and per-sample masks: images 0-3 in one batch or in two give the same counterfactuals.
    Checked in float64: in float32 the batched kernels' rounding (~1e-6, see test_methods) can move a pixel across
    the top-k boundary of a later step, and the hard mask turns that into a visible change (measured: one image of
    four, by up to 0.22), as it would in the public code."""
    import copy

    cfg, p = parts("method=maskdime")
    sampler = copy.deepcopy(p["sampler"])
    sampler.model.double()
    model = copy.deepcopy(p["model"]).double()
    keys = ("tau", "scales", "lambda_l1", "grad_scale", "mask_ratio", "inner_ratio", "mask_dilation", "public_last_noise")
    method = MaskDiME(sampler, model, p["objective"], lambda_perc=0, **{k: cfg.method[k] for k in keys})
    x, idx = images(p, 4)
    x = x.double()
    with torch.no_grad():
        y = p["objective"].target(model(x))
        whole = method.explain(x, y, SampleRNG(0, idx)).x_cf
        halves = torch.cat([method.explain(x[:2], y[:2], SampleRNG(0, idx[:2])).x_cf,
                            method.explain(x[2:], y[2:], SampleRNG(0, idx[2:])).x_cf])
        other = method.explain(x[2:], y[2:], SampleRNG(1, idx[2:])).x_cf
    torch.testing.assert_close(whole, halves, rtol=0, atol=1e-9)
    assert (other - halves[2:]).abs().max() > 0.1  # another seed: another image


def test_debug_fast_makes_real_counterfactuals(tmp_path):
    """`cfx run method=maskdime debug=fast` (4 images; conf/debug/fast/maskdime.yaml): real flips >= 0.75 and
    no noise image (every l1 <= 0.05); the job records tau UNet calls per scale tried."""
    samples, _, real = _job(tmp_path, "method=maskdime", "debug=fast")
    assert len(samples) == 4 and not samples["failed"].any()
    assert real >= 0.75, samples[["index", "success", "oracle_flip", "l1"]]
    assert (samples["l1"] <= 0.05).all(), samples[["index", "success", "oracle_flip", "l1"]]
    tau = OmegaConf.load(CONF_DIR / "debug" / "fast" / "maskdime.yaml").method.tau
    scales = sorted(OmegaConf.load(CONF_DIR / "method" / "maskdime.yaml").scales)
    tried = samples["scale"].map({s: i + 1 for i, s in enumerate(scales)})
    assert (samples["nfe_unet"] == tau * tried).all() and (samples["nfe_unet_backward"] == 0).all()


def test_tuned_job_makes_real_counterfactuals_for_fewer_calls(tmp_path, compose):
    """`cfx run method=maskdime` on the default job's 32 images: real flips >= 0.9, closer to the ideal
    counterfactual than DiME, and fewer UNet calls per image than FastDiME's tuned guided steps alone (its tau,
    composed). 20-50 s on one thread of 2 shared cores."""
    samples, metrics, real = _job(tmp_path, "method=maskdime")
    assert len(samples) == 32 and not samples["failed"].any()
    assert real >= 0.9, samples[["index", "success", "oracle_flip", "l1"]]
    assert metrics["ideal_cf_l1"] <= DIME_IDEAL_CF_L1, metrics
    assert samples["nfe_unet"].mean() < compose(["method=fastdime"]).method.tau, samples["nfe_unet"].describe()


# ------------------------------------------------------------------------------- the CelebA experiments
@pytest.mark.parametrize("experiment,query", [("maskdime_celeba_smile", "smile"), ("maskdime_celeba_age", "young")])
def test_celeba_experiment_end_to_end(tmp_path, compose, files, experiment, query):  # noqa: F811
    """The experiments compose the paper's method values (conf/method/maskdime.yaml) on CelebA's val mini-val with
    DiME's ADM and classifier, and run end to end on tiny files in the real formats (test_celeba_experiments'
    fixtures); only the paths, the tiny ADM's flags and the chain's length are overridden."""
    from cfx_cli.job.loop import job
    from cfx_cli.outputs import read_samples

    root, _ = files
    cfg = compose([f"experiment={experiment}", f"dataset.root={root / 'celeba'}",
                   f"diffusion.path={FIXTURES / 'tiny_adm_celeba_format.pt'}", f"classifier.path={root / 'classifier.pth'}",
                   f"method.perceptual_weights={root / 'vgg19.pth'}", *tiny_adm_overrides(),
                   "dataset.num_images=4", "batch_size=4", "sampler.steps=10", "method.tau=3", "device=cpu"])
    paper = OmegaConf.load(CONF_DIR / "method" / "maskdime.yaml")
    assert (cfg.dataset.query, cfg.dataset.split, cfg.dataset.subset) == (query, "val", "mini_val")
    assert cfg.method._target_.endswith("MaskDiME")
    for key in ("scales", "lambda_l1", "lambda_perc", "grad_scale", "mask_ratio", "inner_ratio", "mask_dilation",
                "step_noise", "public_last_noise", "classifier_loss"):
        assert cfg.method[key] == paper[key], key
    job(cfg, tmp_path / "job")
    assert json.loads((tmp_path / "job" / "status.json").read_text())["state"] == "done"
    s = read_samples(tmp_path / "job")
    tried = s["scale"].map({v: i + 1 for i, v in enumerate(sorted(paper.scales))})
    assert len(s) == 4 and (s["nfe_unet"] == 3 * tried).all() and (s["nfe_unet_backward"] == 0).all()
    assert len(list((tmp_path / "job" / "images" / "mask").glob("*.png"))) == 4


def test_celeba_experiment_without_its_diffusion_weights_is_one_line(tmp_path, files):  # noqa: F811
    """Weights are offline paths: the experiment run without the ADM file stops in one line naming the key."""
    root, _ = files
    missing = tmp_path / "ddpm-celeba.pt"
    out = cfx("run", "experiment=maskdime_celeba_smile", f"dataset.root={root / 'celeba'}", f"diffusion.path={missing}",
              f"classifier.path={root / 'classifier.pth'}", f"method.perceptual_weights={root / 'vgg19.pth'}",
              "dataset.num_images=2", "device=cpu", f"hydra.run.dir={tmp_path / 'job'}", check=False)
    assert out.returncode == 2  # cfx's status for a one-line configuration error
    line = [ln for ln in out.stderr.splitlines() if ln.strip()][-1]
    assert line.startswith("cfx: error: diffusion.path=") and str(missing) in line and "Traceback" not in out.stderr
