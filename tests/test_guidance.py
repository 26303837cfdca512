"""One guided step of DiME and FastDiME, computed by hand.

A stub ε-network (a fixed ε, recording what it is fed) on a 10-step linear schedule, and a linear
classifier whose loss gradients are known in closed form. The expected counterfactual is computed
here from β alone (ᾱ, the posterior coefficients and variance re-derived below, in float64) and the
formulas of METHODS.md — never from the methods' or the sampler's helpers — with the noise the methods
draw reproduced from a twin SampleRNG in the documented order: the q_sample noise first, then per step
the step noise when t > 0 (DiME: then the draws of its unguided chain; FastDiME with a mask: then the
keep-noise when t > 0).

What is pinned: the sign (the target logit goes up), Σ_t scaling, 1/√ᾱ_t (DiME; FastDiME only with
rescale_sqrt_alpha), λ_1·sign(z − x), no noise at t = 0 (and Σ_0 = 0 for fixed_small), DiME's x̂ from the
unguided stochastic chain vs FastDiME's Tweedie x̂, the loss kinds ('logit' / 'ce', softmax and sigmoid
heads), public_code_offset (the q_sample level τ vs τ − 1), public_mask_noise (the level t vs t − 1 kept
outside the mask), and the mask itself.
"""
import math

import pytest
import torch
from torch import nn

from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.diffusion.schedule import NoiseSchedule
from cfx_cli.methods.base import SampleRNG
from cfx_cli.methods.dime import DiME
from cfx_cli.methods.fastdime import FastDiME
from cfx_cli.objectives import ClassificationObjective

T = 10
BETAS = [0.05 + k * (0.3 - 0.05) / (T - 1) for k in range(T)]  # linear β, small T
C, H, W = 2, 4, 4
SEED, INDICES = 7, [3, 11]
ATOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


# ----------------------------------------------------------------------- tables, by hand
ABAR = [math.prod(1 - b for b in BETAS[:t + 1]) for t in range(T)]
ABAR_PREV = [1.0] + ABAR[:-1]
POST_VAR = [BETAS[t] * (1 - ABAR_PREV[t]) / (1 - ABAR[t]) for t in range(T)]
COEF1 = [BETAS[t] * math.sqrt(ABAR_PREV[t]) / (1 - ABAR[t]) for t in range(T)]
COEF2 = [(1 - ABAR_PREV[t]) * math.sqrt(1 - BETAS[t]) / (1 - ABAR[t]) for t in range(T)]


def q(x, t, noise):
    """q_sample(x, t) = √ᾱ_t x + √(1 − ᾱ_t) ε."""
    return math.sqrt(ABAR[t]) * x + math.sqrt(1 - ABAR[t]) * noise


def x0_hat(z, t, eps):
    """Tweedie: (z − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    return (z - math.sqrt(1 - ABAR[t]) * eps) / math.sqrt(ABAR[t])


def post_mean(z, t, eps):
    """The DDPM posterior mean of q(z_{t−1} | z_t, x̂_0)."""
    return COEF1[t] * x0_hat(z, t, eps) + COEF2[t] * z


def hand_mask(a, b, threshold=0.15):
    """normalise(Σ_c |a − b|) > threshold, per image (dilation 1)."""
    d = (a - b).abs().sum(1, keepdim=True)
    return (d / d.amax(dim=(2, 3), keepdim=True) > threshold).double()


# ----------------------------------------------------------------------------- stubs
class StubDiffusion(nn.Module):
    """Protocol-following generative model whose ε_θ is the fixed tensor ``eps``; records its inputs."""

    def __init__(self, eps, variance="fixed_small"):
        super().__init__()
        self.schedule = NoiseSchedule.from_config("linear", T, beta_start=BETAS[0], beta_end=BETAS[-1])
        self.variance, self.clip_denoised = variance, False
        self.eps = eps
        self.calls = []
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, z_t, t, cond=None):
        self.calls.append((z_t.detach().clone(), t.tolist()))
        return self.eps.expand_as(z_t).clone()


class LinearClassifier(nn.Module):
    """f(x) = W · flatten(x) + b."""

    task = "classification"

    def __init__(self, k=2, head="softmax", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(k, C * H * W, generator=g, dtype=torch.float64) / 4
        self.b = torch.randn(k, generator=g, dtype=torch.float64) / 4
        self.head, self.num_classes = head, k

    def forward(self, x):
        return x.flatten(1) @ self.W.T + self.b

    # closed-form gradients w.r.t. x of the per-sample losses, shaped like x
    def grad(self, x, y, kind, query=None):
        if self.head == "softmax":
            if kind == "logit":  # −f_y(x)
                g = -self.W[y]
            else:  # cross-entropy: (softmax(f(x)) − e_y)ᵀ W
                p = self(x).softmax(1)
                g = (p - torch.nn.functional.one_hot(y, self.num_classes).double()) @ self.W
        else:
            w = self.W[query]
            logit = self(x)[:, query]
            if kind == "logit":  # −(2y − 1) f_q(x)
                g = -(2 * y.double() - 1).unsqueeze(1) * w
            else:  # binary cross-entropy: (σ(f_q(x)) − y) w
                g = (torch.sigmoid(logit) - y.double()).unsqueeze(1) * w
        return g.view(-1, C, H, W)


def setup(variance="fixed_small", eps=None, head="softmax", seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    x = (torch.rand(2, C, H, W, generator=g, dtype=torch.float64) * 2 - 1)
    if eps is None:
        eps = 0.3 * torch.randn(1, C, H, W, generator=g, dtype=torch.float64)
    diffusion = StubDiffusion(eps, variance)
    clf = LinearClassifier(k=2 if head == "softmax" else 3, head=head, seed=seed)
    return x, diffusion, DDPMSampler(diffusion, None), clf


def draws(n, shape=(C, H, W)):
    """The first n draws of a twin SampleRNG, per sample (N×C×H×W each), in float64."""
    twin = SampleRNG(SEED, INDICES)
    return [twin.randn(shape).double() for _ in range(n)]


def run(method, x, y):
    return method.explain(x, y, SampleRNG(SEED, INDICES)).x_cf


Y = torch.tensor([1, 0])


# ------------------------------------------------------------------------------- DiME
@pytest.mark.parametrize("public_code_offset", [True, False])
@pytest.mark.parametrize("kind", ["logit", "ce"])
def test_dime_one_guided_step_by_hand(public_code_offset, kind):
    """τ = 2, fixed_small. The input is noised once (index τ in the public code, τ − 1 corrected) and
    two steps run, t = 1 then t = 0, each treating z as level t:

        z  = q(x, start, ε₀)
        z₁ = μ₁(z) − Σ₁ [s ∇L(x)/√ᾱ₁ + λ₁ sign(z − x)] + √Σ₁ ε₁     (x̂ starts as x)
        z₀ = μ₀(z₁) − Σ₀ g = μ₀(z₁)                                 (Σ₀ = 0 for fixed_small; no noise)
    """
    s, lam = 3.0, 0.05
    x, diffusion, sampler, clf = setup()
    obj = ClassificationObjective(head="softmax")
    method = DiME(sampler, clf, obj, tau=2, scales=[s], lambda_l1=lam, lambda_perc=0, classifier_loss=kind,
                  public_code_offset=public_code_offset)
    out = run(method, x, Y)

    e0, e1 = draws(2)
    c = diffusion.eps
    start = 2 if public_code_offset else 1
    z = q(x, start, e0)
    g = s * clf.grad(x, Y, kind) / math.sqrt(ABAR[1]) + lam * torch.sign(z - x)
    z1 = post_mean(z, 1, c) - POST_VAR[1] * g + math.sqrt(POST_VAR[1]) * e1
    z0 = post_mean(z1, 0, c)
    assert POST_VAR[0] == 0.0 and COEF1[0] == pytest.approx(1.0) and COEF2[0] == 0.0
    torch.testing.assert_close(out, z0, rtol=0, atol=ATOL)

    # the UNet saw: z at level τ (public) / τ − 1, told it is level 1; the unguided chain's one step
    # from z₁ at level 0; then the guided step at level 0 on z₁ — 1 + Σ_{k=1}^{τ−1} k + 1 = 3 calls
    assert [t for _, t in diffusion.calls] == [[1, 1], [0, 0], [0, 0]]
    torch.testing.assert_close(diffusion.calls[0][0], z, rtol=0, atol=ATOL)
    torch.testing.assert_close(diffusion.calls[1][0], z1, rtol=0, atol=ATOL)


def test_dime_offset_changes_only_the_noise_level():
    """public_code_offset: noised with √ᾱ_τ vs √ᾱ_{τ−1}; the number of guided steps (τ) is the same."""
    x, diffusion, sampler, clf = setup()
    obj = ClassificationObjective()
    for offset, level in ((True, 2), (False, 1)):
        diffusion.calls.clear()
        run(DiME(sampler, clf, obj, tau=2, scales=[1.0], lambda_perc=0, public_code_offset=offset), x, Y)
        torch.testing.assert_close(diffusion.calls[0][0], q(x, level, draws(1)[0]), rtol=0, atol=ATOL)
        assert diffusion.calls[0][1] == [1, 1]


def test_dime_regenerates_x_hat_with_the_unguided_stochastic_chain():
    """τ = 3, cross-entropy (its gradient depends on x̂): after the step at t = 2, x̂ is the *stochastic*
    unguided chain z₂ → z₁' (noise c₁) → x̂ = μ₀(z₁'); draws in order ε₀ (q_sample), ε₂ (step t=2),
    c₁ (the chain's step at level 1), ε₁ (step t=1); the chain from level 0 and the step at t = 0 draw none."""
    s, lam = 5.0, 0.05
    x, diffusion, sampler, clf = setup(seed=1)
    obj = ClassificationObjective()
    method = DiME(sampler, clf, obj, tau=3, scales=[s], lambda_l1=lam, lambda_perc=0, classifier_loss="ce")
    out = run(method, x, Y)

    e0, e2, c1, e1 = draws(4)
    c = diffusion.eps
    z3 = q(x, 3, e0)
    g = s * clf.grad(x, Y, "ce") / math.sqrt(ABAR[2]) + lam * torch.sign(z3 - x)
    z2 = post_mean(z3, 2, c) - POST_VAR[2] * g + math.sqrt(POST_VAR[2]) * e2
    x_hat = post_mean(post_mean(z2, 1, c) + math.sqrt(POST_VAR[1]) * c1, 0, c)
    g = s * clf.grad(x_hat, Y, "ce") / math.sqrt(ABAR[1]) + lam * torch.sign(z2 - x)
    z1 = post_mean(z2, 1, c) - POST_VAR[1] * g + math.sqrt(POST_VAR[1]) * e1
    z0 = post_mean(z1, 0, c)
    torch.testing.assert_close(out, z0, rtol=0, atol=ATOL)
    # cost: τ guided calls + Σ_{k=1}^{τ−1} k chain calls = 3 + 3
    assert len(diffusion.calls) == 6
    # the gradient really was taken at the chain's x̂: at x it would give another image
    g_at_x = s * clf.grad(x, Y, "ce") / math.sqrt(ABAR[1]) + lam * torch.sign(z2 - x)
    other = post_mean(post_mean(z2, 1, c) - POST_VAR[1] * g_at_x + math.sqrt(POST_VAR[1]) * e1, 0, c)
    assert (other - out).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["logit", "ce"])
@pytest.mark.parametrize("public_code_offset", [True, False])
def test_dime_last_step_with_fixed_large_and_sigmoid_head(kind, public_code_offset):
    """τ = 1: a single guided step at t = 0, visible with fixed_large (Σ₀ = the posterior variance at
    t = 1, guided-diffusion's convention; Σ₀ = 0 under fixed_small would hide it), no noise drawn after
    q_sample. Sigmoid head, query 1 of 3 outputs: L = −(2y* − 1) f_q ('logit') or BCE ('ce')."""
    s, lam = 2.0, 0.1
    x, diffusion, sampler, clf = setup(variance="fixed_large", head="sigmoid", seed=2)
    obj = ClassificationObjective(head="sigmoid", query=1, num_outputs=3)
    method = DiME(sampler, clf, obj, tau=1, scales=[s], lambda_l1=lam, lambda_perc=0, classifier_loss=kind,
                  public_code_offset=public_code_offset)
    out = run(method, x, Y)

    (e0,) = draws(1)
    z = q(x, 1 if public_code_offset else 0, e0)
    var0 = POST_VAR[1]  # fixed_large at t = 0
    g = s * clf.grad(x, Y, kind, query=1) / math.sqrt(ABAR[0]) + lam * torch.sign(z - x)
    torch.testing.assert_close(out, post_mean(z, 0, diffusion.eps) - var0 * g, rtol=0, atol=ATOL)
    assert len(diffusion.calls) == 1 and diffusion.calls[0][1] == [0, 0]


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("kind", ["logit", "ce"])
def test_guidance_moves_the_target_logit_up(head, kind):
    """The sign: against a scale-0 run (same noise, λ₁ = 0) the guided counterfactual raises the
    target's logit (softmax: f_{y*}; sigmoid: the signed query logit (2y* − 1) f_q) — for both methods."""
    x, diffusion, sampler, clf = setup(variance="fixed_large", head=head, seed=3)
    obj = ClassificationObjective(head=head, query=1 if head == "sigmoid" else None,
                                  num_outputs=3 if head == "sigmoid" else None)

    def target_logit(v):
        f = clf(v)
        if head == "softmax":
            return f.gather(1, Y.view(-1, 1)).squeeze(1)
        return (2 * Y.double() - 1) * f[:, 1]

    for make in (lambda s: DiME(sampler, clf, obj, tau=2, scales=[s], lambda_l1=0, lambda_perc=0,
                                classifier_loss=kind),
                 lambda s: FastDiME(sampler, clf, obj, variant="nomask", tau=2, scales=[s], lambda_l1=0,
                                    lambda_perc=0, classifier_loss=kind)):
        guided, plain = run(make(4.0), x, Y), run(make(0.0), x, Y)
        assert (target_logit(guided) > target_logit(plain) + 1e-3).all()


# --------------------------------------------------------------------------- FastDiME
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("public_code_offset", [True, False])
def test_fastdime_one_guided_step_by_hand(rescale, public_code_offset):
    """τ = 2, nomask, cross-entropy: x̂ is Tweedie's one-step estimate of the current z (not x, not a chain);
    no 1/√ᾱ_t unless rescale_sqrt_alpha; one UNet call per step."""
    s, lam = 3.0, 0.05
    x, diffusion, sampler, clf = setup(seed=4)
    obj = ClassificationObjective()
    method = FastDiME(sampler, clf, obj, variant="nomask", tau=2, scales=[s], lambda_l1=lam, lambda_perc=0,
                      classifier_loss="ce", rescale_sqrt_alpha=rescale, public_code_offset=public_code_offset)
    out = run(method, x, Y)

    e0, e1 = draws(2)
    c = diffusion.eps
    z = q(x, 2 if public_code_offset else 1, e0)
    gc = s * clf.grad(x0_hat(z, 1, c), Y, "ce")
    g = (gc / math.sqrt(ABAR[1]) if rescale else gc) + lam * torch.sign(z - x)
    z1 = post_mean(z, 1, c) - POST_VAR[1] * g + math.sqrt(POST_VAR[1]) * e1
    torch.testing.assert_close(out, post_mean(z1, 0, c), rtol=0, atol=ATOL)
    assert [t for _, t in diffusion.calls] == [[1, 1], [0, 0]]
    torch.testing.assert_close(diffusion.calls[0][0], z, rtol=0, atol=ATOL)
    torch.testing.assert_close(diffusion.calls[1][0], z1, rtol=0, atol=ATOL)


@pytest.mark.parametrize("public_mask_noise", [True, False])
def test_fastdime_mask_step_by_hand(public_mask_noise):
    """variant=mask from step 0, τ = 2, dilation 1, threshold 0.15. ε_θ is large on a 2×2 block and 0
    elsewhere, so x̂ − x is dominated by the block and the self-optimised mask is exactly that block.

        t = 1: m₁ = mask(x̂(z), x); x̂ ← m₁ x̂ + (1 − m₁) x; z₁' = μ₁ − Σ₁ g + √Σ₁ ε₁
               z₁ = m₁ z₁' + (1 − m₁) q(x, L, n₁)     L = t = 1 (public_mask_noise) or t − 1 = 0
        t = 0: m₀ = mask(x̂(z₁), x); z₀ = m₀ μ₀(z₁) + (1 − m₀) x     (the clean x outside; no noise)

    Draws: ε₀, ε₁ (step), n₁ (keep-noise). The level L is visible in what the UNet is fed at t = 0."""
    s, lam = 3.0, 0.05
    eps = torch.zeros(1, C, H, W, dtype=torch.float64)
    eps[..., 1:3, 1:3] = 20.0
    block = torch.zeros(2, 1, H, W, dtype=torch.float64)
    block[..., 1:3, 1:3] = 1
    x, diffusion, sampler, clf = setup(eps=eps, seed=5)
    obj = ClassificationObjective()
    method = FastDiME(sampler, clf, obj, variant="mask", mask_start=0, mask_dilation=1, mask_threshold=0.15,
                      tau=2, scales=[s], lambda_l1=lam, lambda_perc=0, classifier_loss="ce",
                      public_mask_noise=public_mask_noise)
    res = method.explain(x, Y, SampleRNG(SEED, INDICES))

    e0, e1, n1 = draws(3)
    z = q(x, 2, e0)
    xh = x0_hat(z, 1, eps)
    m1 = hand_mask(xh, x)
    assert torch.equal(m1, block)  # the premise of the construction
    xh = m1 * xh + (1 - m1) * x
    g = s * clf.grad(xh, Y, "ce") + lam * torch.sign(z - x)
    z1 = post_mean(z, 1, eps) - POST_VAR[1] * g + math.sqrt(POST_VAR[1]) * e1
    level = 1 if public_mask_noise else 0
    z1 = m1 * z1 + (1 - m1) * q(x, level, n1)
    torch.testing.assert_close(diffusion.calls[1][0], z1, rtol=0, atol=ATOL)
    m0 = hand_mask(x0_hat(z1, 0, eps), x)
    assert torch.equal(m0, block)
    z0 = m0 * post_mean(z1, 0, eps) + (1 - m0) * x
    torch.testing.assert_close(res.x_cf, z0, rtol=0, atol=ATOL)
    assert torch.equal(res.x_cf[(1 - block).expand_as(x).bool()], x[(1 - block).expand_as(x).bool()])
    assert torch.equal(res.extras["mask"], block)  # the last step's mask is returned

    # the other setting keeps the unmasked region at the other level: visibly different input at t = 0
    other = q(x, 1 - level, n1)
    outside = (1 - block).expand_as(x).bool()
    assert (diffusion.calls[1][0][outside] - other[outside]).abs().max() > 1e-2
