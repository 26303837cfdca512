"""DiME and FastDiME on the shipped models: they flip the classifier, reach regression targets,
count their cost as the papers do, and give the same image whatever the batch."""
import pytest
import torch

from cfx_cli import ZOO_DIR
from cfx_cli.data.synthetic import SyntheticDataset
from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.methods.base import SampleRNG
from cfx_cli.methods.dime import DiME
from cfx_cli.methods.fastdime import FastDiME
from cfx_cli.models.counting import CostMeter, Counted
from cfx_cli.models.explained import zoo_model
from cfx_cli.models.generative import load_diffusers_ddpm
from cfx_cli.objectives import ClassificationObjective, RegressionObjective

METER = CostMeter()


@pytest.fixture(scope="module")
def parts():
    diffusion = Counted(load_diffusers_ddpm(ZOO_DIR / "synthetic_ddpm"), METER, "unet")
    clf = Counted(zoo_model(ZOO_DIR / "synthetic_shape", "classification"), METER, "model")
    reg = Counted(zoo_model(ZOO_DIR / "synthetic_size", "regression"), METER, "model")
    batch = SyntheticDataset(split="test", num_images=8, seed=0).batch(list(range(8)))
    return diffusion, clf, reg, batch


def sampler(diffusion, steps):
    return DDPMSampler(diffusion, steps)


class Explained:
    """A method's result with the counters' per-sample cost (forward / backward, per role)."""

    def __init__(self, result, cost):
        self.x_cf, self.extras, self.info = result.x_cf, result.extras, result.info
        self.nfe_unet, self.nfe_unet_backward = cost["unet"]["forward"], cost["unet"]["backward"]
        self.nfe_model, self.nfe_model_backward = cost["model"]["forward"], cost["model"]["backward"]


def explain(method, model, objective, x, indices, seed=0):
    with torch.no_grad():
        target = objective.target(model(x))
        METER.start(len(x))
        result = method.explain(x, target, SampleRNG(seed, indices, meter=METER))
        res = Explained(result, METER.stop())
        res.success = objective.success(model(res.x_cf), target)
    return res, target


def test_fastdime_flips_the_shipped_classifier(parts):
    diffusion, clf, _, batch = parts
    obj = ClassificationObjective()
    # The synthetic defaults of conf/tuning/fastdime_synthetic.yaml (1.00 flips measured on 64 images).
    method = FastDiME(sampler(diffusion, 200), clf, obj, variant="mask", tau=60, mask_start=30,
                      scales=(100.0, 200.0, 400.0), lambda_perc=0, classifier_loss="ce")
    res, target = explain(method, clf, obj, batch["x"], batch["index"])
    assert res.success.float().mean() >= 0.75
    # Small edits: the counterfactual stays close to the input on average.
    assert (res.x_cf - batch["x"]).abs().mean() / 2 < 0.1
    # One UNet call per guided step and scale tried, never differentiated; one explained-model
    # forward and backward per step, plus a forward to judge each scale.
    scales_tried = (res.info["scale"].unsqueeze(1) >= torch.tensor(method.scales)).sum(1)
    assert torch.equal(res.nfe_unet, 60 * scales_tried) and not res.nfe_unet_backward.any()
    assert torch.equal(res.nfe_model, 61 * scales_tried)
    assert torch.equal(res.nfe_model_backward, 60 * scales_tried)


def test_dime_flips_with_its_nested_chain_cost(parts):
    diffusion, clf, _, batch = parts
    obj = ClassificationObjective()
    tau = 30  # the synthetic defaults of conf/tuning/dime_synthetic.yaml
    method = DiME(sampler(diffusion, 100), clf, obj, tau=tau, scales=(20.0, 30.0, 45.0), lambda_perc=0,
                  classifier_loss="ce")
    res, target = explain(method, clf, obj, batch["x"][:4], batch["index"][:4])
    assert res.success.float().mean() >= 0.75
    per_scale = tau + sum(range(1, tau))  # τ guided calls + the unguided chains (O(τ²))
    scales_tried = (res.info["scale"].unsqueeze(1) >= torch.tensor(method.scales)).sum(1)
    assert torch.equal(res.nfe_unet, per_scale * scales_tried) and not res.nfe_unet_backward.any()


@pytest.mark.parametrize("variant,passes", [("nomask", 1), ("2", 2), ("2+", 2)])
def test_fastdime_variants(parts, variant, passes):
    diffusion, clf, _, batch = parts
    obj = ClassificationObjective()
    method = FastDiME(sampler(diffusion, 100), clf, obj, variant=variant, tau=30, mask_start=15, scales=(10.0,),
                      lambda_perc=0, classifier_loss="ce")
    res, _ = explain(method, clf, obj, batch["x"][:4], batch["index"][:4])
    assert torch.equal(res.nfe_unet, torch.full((4,), 30 * passes))
    if variant == "nomask":
        assert "mask" not in res.extras
    else:  # the fixed mask of the second pass confines the edit: outside it, the output is the input
        m = res.extras["mask"]
        assert m.shape == (4, 1, 32, 32) and 0 < m.mean() < 1
        outside = (res.x_cf - batch["x"][:4]).abs() * (1 - m)
        assert outside.max() < 1e-5


def test_fastdime_reveals_the_biased_classifiers_shortcut(parts):
    """The biased classifier reads the background only: its counterfactuals change the
    background (as the oracle sees it), the clean classifier's do not."""
    from cfx_cli.models.small_cnn import zoo_oracle

    diffusion, clf, _, batch = parts
    biased = Counted(zoo_model(ZOO_DIR / "synthetic_shape_biased", "classification"), METER, "model")
    oracle = zoo_oracle(ZOO_DIR / "synthetic_oracle")
    with torch.no_grad():
        bg_before = oracle(batch["x"])["bg_colour"].argmax(1)
    obj = ClassificationObjective()
    changed = {}
    for name, model in (("clean", clf), ("biased", biased)):
        method = FastDiME(sampler(diffusion, 200), model, obj, tau=60, mask_start=30, scales=(100.0, 200.0, 400.0),
                          lambda_perc=0, classifier_loss="ce")
        res, _ = explain(method, model, obj, batch["x"], batch["index"])
        assert res.success.float().mean() >= 0.75, name
        with torch.no_grad():
            changed[name] = (oracle(res.x_cf)["bg_colour"].argmax(1) != bg_before).float().mean().item()
    assert changed["biased"] >= 0.5 and changed["clean"] <= 0.25, changed


def test_same_image_whatever_the_batch(parts):
    """Per-sample generators: sample 5 alone equals sample 5 inside a batch, up to float rounding
    (convolution kernels differ with the batch size; ten guided steps grow that to ~1e-3, whereas
    other noise would change pixels by ~1)."""
    diffusion, clf, _, batch = parts
    obj = ClassificationObjective()
    method = FastDiME(sampler(diffusion, 50), clf, obj, tau=10, mask_start=5, scales=(10.0,), lambda_perc=0,
                      classifier_loss="ce")
    full, _ = explain(method, clf, obj, batch["x"][4:8], batch["index"][4:8], seed=7)
    alone, _ = explain(method, clf, obj, batch["x"][5:6], batch["index"][5:6], seed=7)
    diff = (full.x_cf[1:2] - alone.x_cf).abs()
    assert diff.max() < 1e-2 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    other, _ = explain(method, clf, obj, batch["x"][5:6], batch["index"][5:6], seed=8)
    assert (other.x_cf - alone.x_cf).abs().max() > 0.1  # another seed: another image


def test_fastdime_moves_the_regressor_to_its_target(parts):
    diffusion, _, reg, batch = parts
    obj = RegressionObjective(mode="absolute", value=0.8, tolerance=0.05)
    x = batch["x"]
    with torch.no_grad():
        before = (reg(x) - 0.8).abs()
    method = FastDiME(sampler(diffusion, 200), reg, obj, tau=60, mask_start=30, scales=(3000.0, 6000.0, 12000.0),
                      lambda_perc=0)
    res, target = explain(method, reg, obj, x, batch["index"])
    with torch.no_grad():
        after = (reg(res.x_cf) - 0.8).abs()
    assert torch.allclose(target, torch.full_like(target, 0.8))
    assert after.mean() < before.mean() / 2
    assert res.success.float().mean() >= 0.5
