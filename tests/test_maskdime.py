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

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import SampleRNG
from cfx_cli.methods.maskdime import MaskDiME, dual_mask
from cfx_cli.objectives import ClassificationObjective
from test_celeba_experiments import FIXTURES, files, tiny_adm_overrides  # noqa: F401  (files: a fixture)
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
