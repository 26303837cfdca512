"""DVCE against its public code (valentyn1boreiko/DVCEs @ 2de4669), counterfactual level.

The fixtures (tests/fixtures/parity/dvce/{plain,cone}.{safetensors,json}; the JSON says how they were
made) hold what the public code computed on the tiny random ADM of tests/fixtures/adm and two tiny
random CNNs: 3 images of 32², T = 1000 respaced to 20, skip_timesteps 14 (noise to index 5, guided
steps 5..0), λ_c = 0.1, λ_d = 0.15 (L1 through the UNet), gradients rescaled to ‖ε‖; without the cone
(aug_num 1) and with it (30°, aug_num 16, kornia 0.6.4 augmentations), plus every random draw it made.
cfx runs on the same weights with those draws replayed through a NoiseBank.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.methods.augment import DRAWS
from cfx_cli.methods.base import NoiseBank, SampleRNG
from cfx_cli.methods.dvce import DVCE
from cfx_cli.models.counting import CostMeter, Counted
from cfx_cli.models.generative import load_adm
from cfx_cli.objectives import ClassificationObjective

FIX = Path(__file__).parent / "fixtures" / "parity" / "dvce"
ADM = Path(__file__).parent / "fixtures" / "adm"

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(tensors, prefix):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    net.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    return net.eval().requires_grad_(False)


class ZeroOne(nn.Module):
    """The public code hands its classifiers (x + 1) / 2 (dff_attack.py _map_img); cfx's models take [-1, 1]."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x + 1) / 2)


def _uniforms(draws, n, copies):
    """One ImageAugmentations call's kornia draws → cfx's per-sample uniforms N×(copies − 1)×13.

    kornia draws over the B = (copies − 1)·N augmented copies, copy-major (row b = k·N + i): bernoulli(B)
    for the affine, then for its k applied rows rand(k) angles, x-shifts, y-shifts; bernoulli(B) for the
    perspective, then rand(k', 4, 2) corner offsets. cfx draws 13 uniforms per copy and applies a warp
    when u < p: an applied row gets u = 0, a skipped one 0.99; the parameters' uniforms go in place."""
    (ka, ba), (_, ang), (_, tx), (_, ty), (kp, bp), (_, off) = draws
    assert (ka, kp) == ("bernoulli", "bernoulli")
    u = torch.full((copies - 1, n, DRAWS), 0.5)
    a, p = ba.bool().view(copies - 1, n), bp.bool().view(copies - 1, n)
    u[..., 0] = torch.where(a, 0.0, 0.99)
    u[..., 4] = torch.where(p, 0.0, 0.99)
    u[a, 1], u[a, 2], u[a, 3] = ang, tx, ty
    u[p, 5:] = off.reshape(-1, 8)
    return u.transpose(0, 1).contiguous()


def _load(name):
    t = load_file(str(FIX / f"{name}.safetensors"))
    meta = json.loads((FIX / f"{name}.json").read_text())
    draws = [(d["kind"], d["tag"], t[f"draw.{i:04d}"]) for i, d in enumerate(meta["draws"])]
    return t, meta, draws


def _bank(draws, n, copies, cone):
    """The public code's draws in cfx's order. Public code: the initial probability printout's augmentations
    (cone: robust, then explained; cfx prints nothing: dropped), the start noise, then per step the step
    noise (p_sample draws it before cond_fn) and the augmentations of the robust, then the explained model.
    cfx per step: explained, robust, then the noise. The public code's step at t = 0 (noise × 0, guidance
    of a sample it discards) has no counterpart in cfx: dropped."""
    groups, k = [], 0
    while k < len(draws):  # one entry per noise draw, one per augmentation call (its 6 kornia draws)
        kind, tag, d = draws[k]
        if tag == "noise":
            groups.append(("randn", d))
            k += 1
        else:
            groups.append(("rand", _uniforms([(kd, dd) for kd, _, dd in draws[k:k + 6]], n, copies)))
            assert {tg for _, tg, _ in draws[k:k + 6]} == {tag}
            k += 6
    if cone:
        groups = groups[2:]
    start, steps = groups[0], groups[1:]
    per = 3 if cone else 1
    steps = [steps[i:i + per] for i in range(0, len(steps), per)][:-1]
    out = [start]
    for step in steps:
        out += (step[2], step[1], step[0]) if cone else (step[0],)
    return NoiseBank(out)


def _run(name, cone, batched_vjp=False):
    t, meta, draws = _load(name)
    flags = json.loads((ADM / "tiny_adm_flags.json").read_text())
    flags.update(diffusion_steps=1000)
    meter = CostMeter()
    gen = Counted(load_adm(ADM / "tiny_adm_celeba_format.pt", clip_denoised=False, **flags), meter, "unet")
    sampler = DDPMSampler(gen, steps=20)
    model = Counted(ZeroOne(_cnn(t, "explained")), meter, "model")
    robust = Counted(ZeroOne(_cnn(t, "robust")), meter, "robust_model") if cone else None
    copies = meta["settings"]["aug_num"]
    method = DVCE(sampler, model, ClassificationObjective(mode="class", value=0), robust_model=robust, start=5,
                  lambda_c=0.1, lambda_d=0.15, cone_angle=30.0 if cone else None, cone_inside="explained",
                  augmentations=copies, augment_translate=(0.0, 0.1), clip_denoised=False,
                  batched_vjp=batched_vjp)
    x, target = t["x"], t["target"]
    bank = _bank(draws, len(x), copies, cone)
    states = []
    step = sampler.step

    def recording_step(out, tt, noise, mean=None):
        z = step(out, tt, noise, mean)
        states.append(z)
        return z

    sampler.step = recording_step
    meter.start(len(x))
    res = method.explain(x, target, SampleRNG(0, range(len(x)), meter=meter, source=bank))
    counts = meter.stop()
    assert bank.remaining == 0
    return t, meta, res, torch.stack(states), counts, model


@pytest.mark.parametrize("name,cone,batched", [("plain", False, False), ("cone", True, False), ("plain", False, True),
                                               ("cone", True, True)])
def test_dvce_equals_the_public_code(name, cone, batched):
    """batched: cfx's gradients through the UNet in one batched vector-Jacobian product (the same images)."""
    t, meta, res, states, counts, model = _run(name, cone, batched)
    S, n = meta["steps"], len(t["x"])  # the public code's steps (start..0) and batch
    # the chain: z after the first guided step, and after every step (the public code's last step, at
    # t = 0, only feeds its discarded sample)
    torch.testing.assert_close(states[0], t["samples"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states, t["samples"][:-1], rtol=1e-4, atol=1e-5)
    # the counterfactual: the last clean estimate (the public code returns it in [0, 1], clamped)
    torch.testing.assert_close((res.x_cf + 1) / 2, t["x_cf01"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        success = model(res.x_cf).argmax(1) == t["target"]
    assert success.tolist() == meta["success"]
    if cone:  # the angle between the robust and the explained gradient, averaged over cfx's guided steps
        torch.testing.assert_close(res.info["cone_angle_mean"], t["cone_angles"][:S - 1].mean(0), rtol=1e-4, atol=1e-3)
    # Costs. The public code per step: two UNet forwards (p_sample's without gradients, cond_fn's with
    # them; the same numbers) and three backward passes through it (plain: the classifier gradient is
    # taken twice, dff_attack.py:680 and :744); one classifier forward on the aug_num copies per model;
    # the initial probability printout adds one classifier forward; its step t = 0 is guided although its
    # sample is discarded. cfx: one UNet forward per guided step (start..1) plus one for the output, one
    # backward per gradient, nothing at t = 0.
    pub = {role: {k: v // n for k, v in c.items() if k.endswith("images")} for role, c in meta["counts"].items()}
    A = meta["settings"]["aug_num"]
    assert pub["unet"] == {"forward_images": 2 * S, "backward_images": 3 * S}
    assert torch.equal(counts["unet"]["forward"], torch.full((n,), pub["unet"]["forward_images"] // 2))
    passes = 1 if batched else (3 if cone else 2)  # the batched VJP: one backward call through the UNet
    assert torch.equal(counts["unet"]["backward"], torch.full((n,), passes * (S - 1)))
    for role in ("model", "robust_model") if cone else ("model",):
        assert pub[role]["forward_images"] == A * (S + 1)
        assert pub[role]["backward_images"] == A * S * (1 if cone else 2)
        assert torch.equal(counts[role]["forward"], torch.full((n,), A * (S - 1)))
        assert torch.equal(counts[role]["backward"], torch.full((n,), A * (S - 1)))
