"""The samplers: DDIM against diffusers, inversion, differentiable denoising (with checkpointing),
cost counting inside denoise, the known-region blend, the t = 0 conventions, and config errors."""
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from cfx_cli.diffusion.sampler import DDIMSampler, DDPMSampler
from cfx_cli.diffusion.schedule import NoiseSchedule
from cfx_cli.errors import CfxError
from cfx_cli.methods.base import SampleRNG
from cfx_cli.models.counting import CostMeter, Counted


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


class Stub(nn.Module):
    """A generative model following the protocol; ``net(z, t)`` gives its raw output (ε)."""

    def __init__(self, net=None, num_timesteps=1000, variance="fixed_small", clip_denoised=False):
        super().__init__()
        self.net = net
        self.schedule = NoiseSchedule.from_config("linear", num_timesteps)
        self.variance = variance
        self.clip_denoised = clip_denoised

    def forward(self, z_t, t, cond=None):
        return self.net(z_t, t)


class LinearEps(nn.Module):
    """ε_θ(z) = A * z + b: a fixed 3×3 convolution with ‖A‖_1 ≤ k per output (a smooth, Lipschitz-k map)."""

    def __init__(self, k=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            w = torch.randn(3, 3, 3, 3, generator=g)
            self.conv.weight.copy_(w / w.abs().sum(dim=(1, 2, 3), keepdim=True) * k)
            self.conv.bias.copy_(0.1 * torch.randn(3, generator=g))
        self.requires_grad_(False)

    def forward(self, z, t):
        return self.conv(z)


class TinyUNet(nn.Module):
    """A small nonlinear conv net that also reads the (original) timestep."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, z, t):
        h = torch.nn.functional.silu(self.a(z) + (t.float() / 1000).view(-1, 1, 1, 1))
        return self.b(h)


def images(n=2, size=6, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------ DDIM step vs diffusers
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(clip, eta):
    """Our respaced "ddim50" grid of a 1000-step linear schedule is diffusers' DDIMScheduler with
    set_timesteps(50), steps_offset=0, 'leading' spacing: timesteps 980, 960, …, 0, and the step from
    original t goes to t − 20, whose ᾱ is our alphas_cumprod_prev on the respaced grid. At the last step
    (t = 0) ᾱ_prev = 1 in ours (the respaced table starts at 1), i.e. set_alpha_to_one=True; we re-derive ε
    from the (clipped) x̂_0, i.e. use_clipped_model_output=True."""
    sampler = DDIMSampler(Stub(clip_denoised=clip), "ddim50", eta=eta)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                        prediction_type="epsilon")
    ref.set_timesteps(50)
    assert ref.timesteps.tolist() == sampler.schedule.timestep_map.flip(0).tolist() == list(range(980, -1, -20))
    g = torch.Generator().manual_seed(0)
    for i in (49, 30, 7, 1, 0):
        t_orig = int(sampler.schedule.timestep_map[i])
        z, eps, noise = (torch.randn(2, 3, 6, 6, generator=g) for _ in range(3))
        if clip:  # make sure clipping is active: x̂_0 far outside [-1, 1] somewhere
            z = 3 * z
        out = sampler.predict(z, i, output=eps)
        ours = sampler.step(out, i, noise)
        theirs = ref.step(eps, t_orig, z, eta=eta, use_clipped_model_output=True, variance_noise=noise)
        torch.testing.assert_close(out["pred_xstart"], theirs.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, theirs.prev_sample, rtol=1e-5, atol=2e-5)
        if clip:
            assert (out["pred_xstart"].abs() == 1).any()
        if i == 0:  # ᾱ_prev = 1: the last step returns the clean estimate, no noise whatever η
            torch.testing.assert_close(ours, out["pred_xstart"])
    # With set_alpha_to_one=False diffusers would use ᾱ_0 (= 1 − 1e-4) at the last step instead:
    # the convention really matters there, and ours is the one above.
    ref_off = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                            set_alpha_to_one=False, steps_offset=0)
    ref_off.set_timesteps(50)
    z, eps = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)
    out = sampler.predict(z, 0, output=eps)
    assert not torch.allclose(sampler.step(out, 0, None),
                              ref_off.step(eps, 0, z, use_clipped_model_output=True).prev_sample, atol=1e-5)


def test_ddim_eps_override_rederives_x0():
    """step(..., eps=ε̃) uses ε̃ for both the direction and x̂_0 (LDCE's guidance in ε-space)."""
    sampler = DDIMSampler(Stub(), 50)
    z, eps, eps2 = (torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(3))
    out = sampler.predict(z, 10, output=eps)
    ref = sampler.step(sampler.predict(z, 10, output=eps2), 10, None)
    torch.testing.assert_close(sampler.step(out, 10, None, eps=eps2), ref)


# ------------------------------------------------------------------------------ inversion
def test_ddim_inversion_is_exact_for_a_constant_eps():
    """With ε_θ independent of z, DDIM inversion and DDIM denoising are exact inverses step by step
    (both use the same ε, and z_{t+1} = √ᾱ_{t+1} x̂_0 + √(1−ᾱ_{t+1}) ε has the same x̂_0 at t+1), so
    level 0 comes back to float32 rounding on any grid; t_to = −1 then gives x̂_0 at level 0."""
    c = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    sampler = DDIMSampler(Stub(lambda z, t: c.expand_as(z)), 50)
    x = images()
    z = sampler.invert(x)
    assert z.shape == x.shape
    torch.testing.assert_close(sampler.denoise(z, sampler.num_steps - 1, 0), x, rtol=0, atol=2e-4)
    torch.testing.assert_close(sampler.denoise(z, sampler.num_steps - 1, -1), sampler.x0(x, 0), rtol=0, atol=2e-4)


def test_ddim_inversion_reconstructs_with_a_smooth_network():
    """With a Lipschitz ε_θ (a fixed linear conv, Lipschitz constant k = 0.5) inversion takes ε at level t
    for the step t → t+1 while denoising takes it at t+1: a first-order error, O(k Δ) per step, so
    the reconstruction error shrinks ∝ 1/steps. Measured (max |error| over pixels, linear schedule of
    1000 steps, inverted to the middle of the grid): 50 steps ≈ 0.022, 200 steps ≈ 0.0052. We assert
    200 steps ≤ 0.01 (~2× margin), and that quadrupling the steps cuts the error by 3–5× (first order)."""
    model = Stub(LinearEps(k=0.5))
    x = images(size=8)
    err = {}
    for steps in (50, 200):
        sampler = DDIMSampler(model, steps)
        mid = sampler.num_steps // 2
        z = sampler.invert(x, mid)
        assert (z - x).abs().max() > 0.2  # it really went somewhere noisy
        err[steps] = (sampler.denoise(z, mid, 0) - x).abs().max().item()
        # t_to = −1 adds the last step's own x̂_0 (x − √(1−ᾱ_0) ε over √ᾱ_0): still close to x
        assert (sampler.denoise(z, mid, -1) - x).abs().max() < err[steps] + 0.01
    assert err[200] <= 0.01, err
    assert 3.0 <= err[50] / err[200] <= 5.0, err


# -------------------------------------------------------- differentiable denoise + checkpoint
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_checkpointed_denoise_gives_the_same_gradient(kind):
    """Gradient checkpointing recomputes each step's activations in the backward pass: the gradients
    w.r.t. the input and the network's weights equal those of the stored graph (same noise drawn)."""
    model = Stub(TinyUNet(), num_timesteps=100)
    grads = []
    for ck in (False, True):
        sampler = DDPMSampler(model, 10) if kind == "ddpm" else DDIMSampler(model, 10, eta=0.5)
        rng = SampleRNG(3, [0, 7])
        z = images(size=5).requires_grad_(True)
        model.zero_grad()
        out = sampler.denoise(z, 3, -1, rng, grad=True, checkpoint=ck)
        assert out.requires_grad
        (out.square().sum() + out.sum()).backward()
        grads.append((z.grad.clone(), [p.grad.clone() for p in model.parameters()], out.detach()))
    (g0, p0, o0), (g1, p1, o1) = grads
    assert torch.equal(o0, o1)
    assert g0.abs().sum() > 0
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-6)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # checkpoint=None takes the sampler's own setting (checkpoint=True in the constructor): same gradient
    sampler = DDPMSampler(model, 10, checkpoint=True) if kind == "ddpm" else DDIMSampler(model, 10, 0.5, True)
    z = images(size=5).requires_grad_(True)
    (out := sampler.denoise(z, 3, -1, SampleRNG(3, [0, 7]), grad=True)).square().add(out).sum().backward()
    torch.testing.assert_close(z.grad, g0, rtol=0, atol=1e-6)
    # grad=False keeps no graph
    assert not sampler.denoise(images(size=5).requires_grad_(True), 3, -1, SampleRNG(3, [0, 7])).requires_grad


# ----------------------------------------------------------------------------- counting
def counted_setup():
    meter = CostMeter()
    model = Counted(Stub(TinyUNet(), num_timesteps=100), meter, "unet")
    return meter, model, DDPMSampler(model, 10)


def test_denoise_with_grad_counts_forwards_and_backwards_per_active_row():
    """Three steps on rows 1 and 3 of a batch of 4: each active row is charged 3 UNet forwards and,
    once the loss is backpropagated, 3 backward passes; the other rows nothing."""
    meter, model, sampler = counted_setup()
    meter.start(4)
    rng = SampleRNG(0, range(4), meter=meter)
    x = images(4, size=5)
    with rng.subset(torch.tensor([1, 3])) as sub:
        assert sub.rows.tolist() == [1, 3]
        z = x[[1, 3]].clone().requires_grad_(True)
        out = sampler.denoise(z, 2, -1, sub, grad=True, checkpoint=False)
        out.square().sum().backward()
        # a batched call on 2× the active rows (conditional + unconditional) counts 2 per sample
        model(torch.cat([z, z]).detach(), torch.zeros(4, dtype=torch.long))
    # without gradients only forwards are charged
    with rng.subset(torch.tensor([False, False, True, False])) as sub:
        sampler.denoise(x[[2]], 1, -1, sub)
    counts = meter.stop()["unet"]
    assert counts["forward"].tolist() == [0, 3 + 2, 2, 3 + 2]
    assert counts["backward"].tolist() == [0, 3, 0, 3]
    # nothing is counted once the meter is stopped
    sampler.denoise(x, 1, -1, rng)
    assert meter.counts["unet"]["forward"].tolist() == [0, 5, 2, 5]


def test_checkpointed_recompute_is_charged_to_the_rows_that_ran():
    meter, model, sampler = counted_setup()
    meter.start(4)
    rng = SampleRNG(0, range(4), meter=meter)
    with rng.subset(torch.tensor([1, 3])) as sub:
        z = images(2, size=5).requires_grad_(True)
        out = sampler.denoise(z, 2, -1, sub, grad=True, checkpoint=True)
    out.square().sum().backward()
    counts = meter.stop()["unet"]
    assert counts["backward"].tolist() == [0, 3, 0, 3]
    # the recomputation in the backward pass is a real UNet evaluation, charged to the rows that ran
    assert counts["forward"].tolist() == [0, 6, 0, 6], counts["forward"]


# -------------------------------------------------------------------- blend and t = 0 rules
def test_blend_keeps_the_known_region_noised_and_the_masked_region_exact():
    sampler = DDPMSampler(Stub(), 100)
    z, known, noise = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(3))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:3, :2] = 1
    inside, outside = mask.expand_as(z).bool(), ~mask.expand_as(z).bool()
    for t in (0, 40, 99):
        out = sampler.blend(z, known, mask, t, noise)
        a = sampler.schedule.alphas_cumprod[t]
        q = a.sqrt().float() * known + (1 - a).sqrt().float() * noise
        assert torch.equal(out[inside], z[inside])
        torch.testing.assert_close(out[outside], q[outside])
    out = sampler.blend(z, known, mask, -1, None)  # t < 0: the clean known image
    assert torch.equal(out[inside], z[inside]) and torch.equal(out[outside], known[outside])


def test_ddpm_step_adds_no_noise_at_t0_and_fixed_small_convention():
    """guided-diffusion's fixed_small: variance = the true posterior variance (0 at t = 0, so guidance
    μ − Σ g does nothing there), log_variance clipped to the t = 1 value (finite); no noise at t = 0."""
    model = Stub(num_timesteps=100)
    sampler = DDPMSampler(model, 100)
    s = sampler.schedule
    z, eps, noise = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(3))
    out0 = sampler.predict(z, 0, output=eps)
    assert torch.equal(out0["variance"], torch.zeros_like(z))
    assert torch.isfinite(out0["log_variance"]).all()
    torch.testing.assert_close(out0["log_variance"], torch.full_like(z, s.posterior_variance[1].log().item()))
    assert torch.equal(sampler.step(out0, 0, noise), out0["mean"])
    # at t = 0 the posterior mean is the clean estimate itself (coef1 = 1, coef2 = 0)
    torch.testing.assert_close(out0["mean"], out0["pred_xstart"])
    out5 = sampler.predict(z, 5, output=eps)
    var5 = s.betas[5] * (1 - s.alphas_cumprod[4]) / (1 - s.alphas_cumprod[5])
    torch.testing.assert_close(out5["variance"], torch.full_like(z, var5.item()))
    torch.testing.assert_close(out5["log_variance"], torch.full_like(z, var5.log().item()))
    torch.testing.assert_close(sampler.step(out5, 5, noise), out5["mean"] + var5.sqrt().float() * noise)
    assert torch.equal(sampler.step(out5, 5, None), out5["mean"])  # no noise given: the mean
    # a custom (guided) mean replaces μ but the noise is the same
    torch.testing.assert_close(sampler.step(out5, 5, noise, mean=out5["mean"] + 1), sampler.step(out5, 5, noise) + 1)


def test_network_sees_original_timesteps():
    seen = []
    model = Stub(lambda z, t: seen.append(t.tolist()) or torch.zeros_like(z))
    sampler = DDPMSampler(model, "ddim50")
    sampler.denoise(torch.zeros(2, 3, 2, 2), 2, -1, SampleRNG(0, [0, 1]))
    assert seen == [[40, 40], [20, 20], [0, 0]]


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("steps", [0, -5, 1001])
def test_steps_out_of_range_is_one_line_error(steps):
    with pytest.raises(CfxError) as e:
        DDPMSampler(Stub(), steps)
    msg = str(e.value)
    assert "\n" not in msg and "sampler.steps" in msg and str(steps) in msg and "1..1000" in msg


@pytest.mark.parametrize("steps", ["ddim999", "1001", "0", 50.0])
def test_unusable_respacing_specs_are_one_line_errors(steps):
    with pytest.raises(CfxError) as e:
        DDPMSampler(Stub(), steps)
    assert "\n" not in str(e.value) and "sampler.steps" in str(e.value)


def test_other_sampler_errors_are_one_line():
    with pytest.raises(CfxError) as e:
        DDIMSampler(Stub(), 50, eta=1.5)
    assert "\n" not in str(e.value) and "sampler.eta" in str(e.value)
    sampler = DDPMSampler(Stub(), 50)
    sampler.check_level(49, "method.tau")
    with pytest.raises(CfxError) as e:
        sampler.check_level(50, "method.tau")
    assert "\n" not in str(e.value) and "method.tau=50" in str(e.value)
    model = Stub()
    assert DDPMSampler(model, 1000).schedule is model.schedule is DDPMSampler(model, None).schedule
