"""ACE (ℓ1, ℓ2) and AC-RE against their official code, draw for draw.

Fixtures (tests/fixtures/parity/ace/*.json say how each was made): the official code run on the tiny random
ADM of tests/fixtures/adm and a small random CNN, every random draw recorded. cfx runs on the same weights
and replays the draws (NoiseBank) with the public-code switches, and must give the same pre-explanation
after every PGD step, mask, counterfactual, success decisions and UNet / model call counts.
"""
import hashlib
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


def load(name, role="classifier"):
    meta = json.loads((PARITY / f"{name}.json").read_text())
    # the weights the official code ran
    assert hashlib.sha256((ADM / "tiny_adm_celeba_format.pt").read_bytes()).hexdigest() == meta["models"]["unet_sha256"]
    t = load_file(str(PARITY / f"{name}.safetensors"))
    noise = [t[k] for k in sorted(k for k in t if k.startswith("noise."))]
    net = SmallNet()
    net.load_state_dict({k[len(role) + 1:]: v for k, v in t.items() if k.startswith(role + ".")})
    return meta, t, noise, net


def run(method_kwargs, meta, t, noise, net, generative, task, objective):
    s = meta["settings"]
    meter = CostMeter()
    model = Counted(ExplainedModel(net, task, head="sigmoid", num_classes=1) if task == "classification"
                    else ExplainedModel(net, task), meter, "model")
    sampler = DDPMSampler(Counted(generative, meter, "unet"), steps=s["timestep_respacing"])
    method = ACE(sampler, model, objective, tau=s["respaced_tau"], iterations=s["attack_iterations"],
                 step=s["attack_step"], epsilon=s["attack_epsilon"], lambda_l1=s["dist_l1"], lambda_l2=s["dist_l2"],
                 mask_dilation=s["sampling_dilation"], mask_threshold=s["sampling_inpaint"],
                 loss_reduction="mean", **method_kwargs)  # the public code averages the loss over its batch
    x = t["x"] * 2 - 1
    bank = NoiseBank(noise)
    rng = SampleRNG(0, range(len(x)), meter=meter, source=bank)
    iterates, gradients = [], []
    gradient = method.gradient
    method.gradient = lambda *a: (lambda r: gradients.append(r[0].clone()) or r)(gradient(*a))
    project = method.project
    method.project = lambda pe01, x01: (lambda r: iterates.append(r.clone()) or r)(project(pe01, x01))
    meter.start(len(x))
    result = method.explain(x, t["target"].view(len(x)), rng)
    counts = meter.stop()
    assert bank.remaining == 0  # every recorded draw used, in order
    return result, iterates, gradients, counts


@pytest.mark.parametrize("variant", ["l1", "l2"])
def test_ace_matches_the_official_code(variant, generative):
    meta, t, noise, net = load(f"ace_{variant}")
    s = meta["settings"]
    objective = ClassificationObjective("flip", head="sigmoid", query=0, num_outputs=1)
    result, iterates, gradients, counts = run(dict(classifier_loss="ce"), meta, t, noise, net, generative,
                                              "classification", objective)
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


def test_ac_re_matches_the_official_code(generative):
    """AC-RE on the squares' setting (step 2/255, no distance term, dilation 5, stop at |y − y*| ≤ 0.05),
    three samples: one stops at the 2nd iteration, one at the 4th, one never (4 iterations)."""
    meta, t, noise, net = load("acre", "regressor")
    s = meta["settings"]
    n, tau, iters = len(t["x"]), s["respaced_tau"], s["attack_iterations"]
    # The public main() first reconstructs x through the filter (x_reconstructed, a figure of the paper's,
    # never used by the method): its draws come first in the bank and cfx makes no such pass.
    initial = 1 + (tau - 1)
    noise = noise[initial:]
    target = t["target"].view(n)
    objective = RegressionObjective("absolute", value=0.5, tolerance=s["confidence_threshold"])
    result, iterates, gradients, counts = run(dict(early_stop=True, stop_after_step=True), meta, t, noise, net,
                                              generative, "regression", objective)
    # which samples the public PGD was still attacking at each iteration: the stop is decided on
    # f(F_τ(x′)) before that iteration's step (which the public code still takes)
    reached = (t["filtered_predictions"].view(-1, n) - target).abs() <= s["confidence_threshold"]
    stop = [int(r.nonzero()[0]) if r.any() else None for r in reached.T]
    running = [torch.tensor([k <= (iters if j is None else j) for j in stop]) for k in range(iters)]
    assert stop == [1, 3, None]  # the fixture's three cases
    assert len(gradients) == iters
    for k in range(iters):  # cfx works on the running samples only; the public code on the whole batch
        torch.testing.assert_close(gradients[k], t["pgd_gradients"][k][running[k]], rtol=1e-4, atol=1e-7)
        close(iterates[k], t["pre_explanation_iterates"][k][running[k]])
    close((result.extras["pre_explanation"] + 1) / 2, t["pre_explanation"])
    assert torch.equal(result.extras["mask"], t["mask"])
    close((result.x_cf + 1) / 2, t["counterfactual"])
    # success: the public AC-RE reports its stopping rule (on the filtered x′); cfx reports it as pgd_reached and
    # judges the final image, the same test as the public code's y_final
    assert torch.equal(result.info["pgd_reached"], t["success"])
    with torch.no_grad():
        y_final = ExplainedModel(net, "regression")(result.x_cf)
    close(y_final, t["prediction_final"].view(n))
    its = torch.tensor([iters if j is None else j + 1 for j in stop])
    assert torch.equal(result.info["pgd_iterations"].long(), its)
    # the public steps_needed: the last 0-based iteration a sample was still attacking when checked
    assert t["steps_done"].long().tolist() == [max(j - 1, 0) if j is not None else iters - 1 for j in stop]
    # calls: cfx charges each sample its own iterations; the public code runs the whole batch through the
    # filter until the last sample stops (4 iterations here), plus the reconstruction pass
    c = meta["calls"]
    assert c["unet_forward_calls_with_grad"] == iters * tau == c["pgd_iterations_run"] * tau
    assert c["unet_forward_calls_without_grad"] == 2 * tau and c["unet_calls_initial_reconstruction"] == tau
    assert counts["unet"]["forward"].tolist() == (its * tau + tau).tolist()
    assert counts["unet"]["backward"].tolist() == (its * tau).tolist()
    assert counts["model"]["backward"].tolist() == its.tolist()
