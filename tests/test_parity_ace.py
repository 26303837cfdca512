"""ACE (ℓ1, ℓ2) and AC-RE against their official code, draw for draw.

Fixtures (tests/fixtures/parity/ace/*.json say how each was made): the official code run on the tiny random
ADM of tests/fixtures/adm and a small random CNN, every random draw recorded. cfx runs on the same weights
and replays the draws (NoiseBank) with the public-code switches, and must give the same pre-explanation
after every PGD step, mask, counterfactual, success decisions and UNet / model call counts.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.methods.ace import ACE
from cfx_cli.methods.base import NoiseBank, SampleRNG
from cfx_cli.models.counting import CostMeter, Counted
from cfx_cli.models.explained import ExplainedModel
from cfx_cli.models.generative import load_adm
from cfx_cli.objectives import ClassificationObjective, RegressionObjective

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity" / "ace"
ADM = FIXTURES / "adm"

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallNet(torch.nn.Module):
    """The explained model of the fixtures: conv 3-8-16 + linear, one output, on [-1, 1] images."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def generative():
    flags = json.loads((ADM / "tiny_adm_flags.json").read_text())
    flags = {k: v for k, v in flags.items() if k not in ("timestep_respacing", "dropout")}
    return load_adm(ADM / "tiny_adm_celeba_format.pt", diffusion_steps=flags.pop("diffusion_steps"), **flags)


def load(name):
    meta = json.loads((PARITY / f"{name}.json").read_text())
    t = load_file(str(PARITY / f"{name}.safetensors"))
    noise = [t[k] for k in sorted(k for k in t if k.startswith("noise."))]
    net = SmallNet()
    net.load_state_dict({k[len("classifier."):]: v for k, v in t.items() if k.startswith("classifier.")})
    return meta, t, noise, net


def run(method_kwargs, meta, t, noise, net, generative, task, objective):
    s = meta["settings"]
    meter = CostMeter()
    model = Counted(ExplainedModel(net, task, head="sigmoid", num_classes=1) if task == "classification"
                    else ExplainedModel(net, task), meter, "model")
    sampler = DDPMSampler(Counted(generative, meter, "unet"), steps=s["timestep_respacing"])
    method = ACE(sampler, model, objective, tau=s["respaced_tau"], step=s["attack_step"],
                 epsilon=s["attack_epsilon"], mask_dilation=s["sampling_dilation"],
                 mask_threshold=s["sampling_inpaint"], loss_reduction="mean", **method_kwargs)
    x = t["x"] * 2 - 1
    bank = NoiseBank(noise)
    rng = SampleRNG(0, range(len(x)), meter=meter, source=bank)
    iterates, gradients = [], []
    gradient = method.gradient
    method.gradient = lambda *a: (lambda r: gradients.append(r[0].clone()) or r)(gradient(*a))
    project = method.project
    method.project = lambda pe01, x01: (lambda r: iterates.append(r.clone()) or r)(project(pe01, x01))
    meter.start(len(x))
    result = method.explain(x, t["target"], rng)
    counts = meter.stop()
    assert bank.remaining == 0  # every recorded draw used, in order
    return result, iterates, gradients, counts


@pytest.mark.parametrize("variant", ["l1", "l2"])
def test_ace_matches_the_official_code(variant, generative):
    meta, t, noise, net = load(f"ace_{variant}")
    s = meta["settings"]
    objective = ClassificationObjective("flip", head="sigmoid", query=0, num_outputs=1)
    result, iterates, gradients, counts = run(dict(iterations=s["attack_iterations"], lambda_l1=s["dist_l1"],
                                        lambda_l2=s["dist_l2"], classifier_loss="ce"),
                                   meta, t, noise, net, generative, "classification", objective)
    n, tau, iters = len(t["x"]), s["respaced_tau"], s["attack_iterations"]
    for k in range(iters):  # the gradient PGD takes the sign of (~1e-3; equal to ~1e-8), then x′ after the step
        torch.testing.assert_close(gradients[k], t["pgd_gradients"][k], rtol=1e-4, atol=1e-7)
        close(iterates[k], t["pre_explanation_iterates"][k])
    close((result.extras["pre_explanation"] + 1) / 2, t["pre_explanation"])
    assert torch.equal(result.extras["mask"], t["mask"])
    close((result.x_cf + 1) / 2, t["counterfactual"])
    # success: the public code judges the pre-explanation; cfx reports both
    assert torch.equal(result.info["success_pre_explanation"], t["success_pre_explanation"])
    with torch.no_grad():
        final = objective.success(result_model(net)(result.x_cf), t["target"]).float()
    assert torch.equal(final, t["success_final"])
    # calls: the official counts are whole-batch calls, each carrying every sample
    c = meta["calls"]
    assert c["unet_forward_calls_with_grad"] == iters * tau and c["unet_forward_calls_without_grad"] == tau
    assert counts["unet"]["forward"].tolist() == [iters * tau + tau] * n
    assert counts["unet"]["backward"].tolist() == [iters * tau] * n
    assert counts["model"]["forward"].tolist() == [c["classifier_forward_calls_with_grad"] + 1] * n  # + cfx's own judgement of x′
    assert counts["model"]["backward"].tolist() == [iters] * n


def result_model(net):
    return ExplainedModel(net, "classification", head="sigmoid", num_classes=1)
