"""DiME against the official code (github.com/guillaumejs2403/DiME), counterfactual for counterfactual.

The fixture (tests/fixtures/parity/dime/dime.json says how it was made) is the official main.py batch loop
with get_DiME_iterative_sampling run on the tiny random ADM of tests/fixtures/adm (T = 500 respaced to 20,
learned sigma), a small random 40-logit classifier (query 31), seeded random VGG19 features[:18] for the
perceptual term (λ_p = 30), λ_1 = 0.05, use_logits, τ = 5 and scales [8, 12]: the first scale flips one of the
three images, the second re-runs the other two from the same noisy image and flips one more.

cfx runs the same weights on the official code's recorded noise (a NoiseBank) with the public code's
switches (public_code_offset: noise to index τ, denoise from τ − 1) and must give the same counterfactuals,
the same clean estimates and states along the way, the same success decisions and the same call counts.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.methods.base import NoiseBank, SampleRNG
from cfx_cli.methods.dime import DiME
from cfx_cli.models.counting import CostMeter, Counted
from cfx_cli.models.explained import ExplainedModel
from cfx_cli.models.generative import load_adm
from cfx_cli.objectives import ClassificationObjective

ROOT = Path(__file__).parent / "fixtures"
FIX = ROOT / "parity" / "dime"
TOL = dict(rtol=1e-4, atol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallClassifier(nn.Module):
    """The fixture's classifier: 40 attribute logits, as DiME's CelebA DenseNet (weights in the fixture)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(256, 40)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


def vgg_weights(seed=4, upto=18):
    """The fixture's VGG19 features[:18] (its json: vgg.recipe), torchvision's key names."""
    g = torch.Generator().manual_seed(seed)
    state, idx, cin = {}, 0, 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"]:
        if idx >= upto:
            break
        if v == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(v, cin, 3, 3, generator=g) * (2.0 / (cin * 9)) ** 0.5
        state[f"features.{idx}.bias"] = torch.randn(v, generator=g) * 0.01
        idx, cin = idx + 2, v
    return state


def parts(fx, meta, tmp_path):
    """cfx's parts with the fixture's weights, wrapped in counters as the runner wraps them."""
    import hashlib

    vgg = vgg_weights()
    assert hashlib.sha256(b"".join(vgg[k].numpy().tobytes() for k in sorted(vgg))).hexdigest() == meta["vgg"]["sha256"]
    save_file(vgg, str(tmp_path / "vgg.safetensors"))
    adm_file = ROOT / "adm" / "tiny_adm_celeba_format.pt"
    assert hashlib.sha256(adm_file.read_bytes()).hexdigest() == meta["adm"]["sha256"]  # the UNet the official code ran
    flags = json.loads((ROOT / "adm" / "tiny_adm_flags.json").read_text())
    flags = {k: v for k, v in flags.items() if k not in ("timestep_respacing", "diffusion_steps", "noise_schedule")}
    adm = load_adm(adm_file, diffusion_steps=500, noise_schedule="linear", **flags)
    net = SmallClassifier()
    net.load_state_dict({k[len("classifier."):]: v for k, v in fx.items() if k.startswith("classifier.")})
    meter = CostMeter()
    model = Counted(ExplainedModel(net, "classification", num_classes=40, head="sigmoid"), meter, "model")
    sampler = DDPMSampler(Counted(adm, meter, "unet"), steps=int(meta["settings"]["timestep_respacing"]))
    objective = ClassificationObjective(head="sigmoid", query=meta["settings"]["query_label"], num_outputs=40)
    return sampler, model, objective, meter, tmp_path / "vgg.safetensors"


def replay_bank(fx, meta, n):
    """The official draws, as cfx asks for them. Two changes, both in the order of draws only:
    - the official code draws step noise at t = 0 too and multiplies it by 0 (p_sample_loop's nonzero_mask),
      and FastDiME's keep-noise q_sample(x, 0) is overwritten by the final blend with x; cfx draws neither,
      so those draws are dropped;
    - a draw for the images not flipped yet is a k-row tensor there; the bank holds whole-batch rows, so
      it goes to its rows (the others, never read, stay 0)."""
    draws = []
    for i, d in enumerate(meta["draws"]):
        if d["t"] == 0:
            continue
        full = torch.zeros(n, *fx[f"noise.{i:03d}"].shape[1:])
        full[d["rows"]] = fx[f"noise.{i:03d}"]
        draws.append(full)
    return NoiseBank(draws)


def record_gradients(method):
    """The (x̂, z) at which each guided step's gradient is taken, in order."""
    seen, gradient = [], method.gradient

    def wrapped(x_hat, x, z, *a, **k):
        seen.append((x_hat.clone(), z.clone()))
        return gradient(x_hat, x, z, *a, **k)

    method.gradient = wrapped
    return seen


def run(method, fx, meta, model, objective, meter, whole_bank=True):
    x, n = fx["x"], fx["x"].shape[0]
    with torch.no_grad():
        target = objective.target(model(x))  # meter not started: not counted, as the runner's first call
    assert torch.equal(target, fx["target"])
    bank = replay_bank(fx, meta, n)
    seen = record_gradients(method)
    meter.start(n)
    result = method.explain(x, target, SampleRNG(0, range(n), meter=meter, source=bank))
    counts = meter.stop()
    assert bank.remaining == 0 or not whole_bank
    with torch.no_grad():
        success = objective.success(model(result.x_cf), target)
    return result, success, counts, seen


def check_result(result, success, counts, fx):
    torch.testing.assert_close(result.x_cf, fx["x_cf"], **TOL)
    assert torch.equal(success, fx["success"])
    torch.testing.assert_close(result.info["scale"], fx["scale_used"])
    assert torch.equal(counts["unet"]["forward"], fx["nfe_unet"])
    assert torch.equal(counts["model"]["forward"], fx["nfe_model"])
    assert torch.equal(counts["model"]["backward"], fx["nbe_model"])


@pytest.fixture(scope="module")
def fixture():
    return load_file(str(FIX / "dime.safetensors")), json.loads((FIX / "dime.json").read_text())


def test_dime_matches_the_official_code(fixture, tmp_path):
    fx, meta = fixture
    s = meta["settings"]
    sampler, model, objective, meter, vgg = parts(fx, meta, tmp_path)
    method = DiME(sampler, model, objective, tau=s["start_step"], scales=[float(v) for v in s["classifier_scales"].split(",")],
                  lambda_l1=s["l1_loss"], lambda_perc=s["l_perc"], perceptual_weights=str(vgg), classifier_loss="logit",
                  public_code_offset=True)
    result, success, counts, seen = run(method, fx, meta, model, objective, meter)
    # the retry is exercised: scale 8 flips one image, scale 12 re-runs the two others and flips one
    assert fx["success"].tolist() == [True, False, True] and fx["scale_used"].tolist() == [8.0, 12.0, 12.0]
    check_result(result, success, counts, fx)
    # the states along the way: per pass, z after the first guided step and the clean estimate x̂ (the
    # unguided chain's output) at which the second gradient is taken
    tau = s["start_step"]
    for p, info in enumerate(meta["passes"]):
        x_hat, z = seen[p * tau + 1]
        torch.testing.assert_close(z, fx[f"pass{p}.z_1"], **TOL)
        torch.testing.assert_close(x_hat, fx[f"pass{p}.x_hat_1"], **TOL)
        assert x_hat.shape[0] == len(info["rows"])
    assert counts["unet"]["forward"].tolist() == [15, 30, 30]  # τ + Σ_{k<τ} k = 5 + 10 per scale


def test_perceptual_term_clamps_its_inputs_as_dimes_normalizer(tmp_path):
    """DiME's PerceptualLoss feeds VGG Normalizer(x) = ((clamp(x, -1, 1) + 1) / 2 - μ) / σ: a clean estimate
    outside [-1, 1] is read as its clamp and passes no gradient there."""
    from cfx_cli.models.perceptual import VGGPerceptual

    save_file(vgg_weights(), str(tmp_path / "vgg.safetensors"))
    vgg = VGGPerceptual(str(tmp_path / "vgg.safetensors"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    x[0, :, 3, 4] = torch.tensor([1.7, -1.4, 1.2])
    x.requires_grad_(True)
    loss = vgg(x, y)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(grad[0, :, 3, 4], torch.zeros(3))
    torch.testing.assert_close(loss, vgg(x.detach().clamp(-1, 1), y))
