"""Metrics and objectives against values computed by hand."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cfx_cli import ZOO_DIR
from cfx_cli.data.synthetic import SyntheticWorld
from cfx_cli.errors import CfxError
from cfx_cli.methods.base import difference_mask
from cfx_cli.metrics.sample import OracleMetrics, distances
from cfx_cli.metrics.summary import summarise
from cfx_cli.objectives import ClassificationObjective, RegressionObjective, build_objective


def test_distances_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    x_cf = x.clone()
    x_cf[0, 0, 0, 0] = 1.0  # 0.5 in [0, 1] units, one of 48 values
    x_cf[1] = -1.0  # every value moves by 0.5
    d = distances(x, x_cf)
    assert d["l1"] == pytest.approx([0.5 / 48, 0.5])
    assert d["l2"] == pytest.approx([np.sqrt(0.25 / 48), 0.5])


def test_summary_by_hand():
    s = pd.DataFrame({"index": [0, 1, 2, 3], "success": [True, True, False, True], "failed": [False, False, False, True],
                      "pred": [0.1, 0.2, 0.9, 0.5], "target": [0.8, 0.8, 0.2, 0.8], "cf_pred": [0.78, 0.84, 0.5, 0.8],
                      "l1": [0.1, 0.2, 0.3, 9.0], "nfe_unet": [60, 60, 180, 0], "seconds": [1.0, 1.0, 2.0, 0.0],
                      "peak_mem_mib": [300.0, 300.0, 420.5, 420.5]})
    m = summarise(s, "regression")
    assert m["success_rate"] == 0.5  # the failed sample counts as not reached
    assert m["num_failed"] == 1
    assert m["mae_to_target"] == pytest.approx((0.02 + 0.04 + 0.3) / 3)
    assert m["mae_to_target_before"] == pytest.approx((0.7 + 0.6 + 0.7) / 3)
    assert m["l1"] == pytest.approx(0.2) and m["nfe_unet"] == 100 and m["seconds_per_cf"] == pytest.approx(4 / 3)
    assert m["peak_mem_mib"] == 420.5  # the largest batch's peak, not a mean
    c = summarise(s.assign(failed=False), "classification")
    assert c["flip_rate"] == 0.75 and "mae_to_target" not in c


def test_peak_memory_sees_a_large_allocation():
    from cfx_cli.metrics.cost import PeakMemory

    with PeakMemory("cpu") as before:
        pass
    # More than the process has ever held: the high-water mark must rise by about its size.
    n = int((before.mib + 256) * 2**20 / 4)
    with PeakMemory("cpu") as peak:
        big = torch.ones(n)
        del big
    assert peak.mib >= before.mib + 200
    # per block, not a high-water mark of the process: the next block without it reports less
    with PeakMemory("cpu") as after:
        torch.ones(10)
    assert after.mib < peak.mib - 200


def test_objectives():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    clf = ClassificationObjective()
    t = clf.target(logits)
    assert t.tolist() == [1, 0]
    assert clf.success(logits, t).tolist() == [False, False]
    assert clf.loss(logits, t) == pytest.approx(torch.nn.functional.cross_entropy(logits, t, reduction="none"))
    assert clf.loss(logits, t, "logit").tolist() == [1.0, -0.0]
    y = torch.tensor([0.1, 0.7])
    assert RegressionObjective(mode="absolute", value=0.5).target(y).tolist() == [0.5, 0.5]
    assert RegressionObjective(mode="shift", value=0.4).target(y).tolist() == pytest.approx([0.5, 1.0])  # clamped

    class Regressor:
        task = "regression"

    auto = build_objective(Regressor(), {"mode": "auto", "query": None})
    assert auto.target(y).tolist() == pytest.approx([0.8, 0.2])
    assert auto.success(torch.tensor([0.76, 0.3]), torch.tensor([0.8, 0.2])).tolist() == [True, False]


def test_sigmoid_head_objective_by_hand():
    """CelebA-style 40-logit head: the query attribute is a binary decision, class 1 when its logit > 0."""

    class Attributes:
        task, head, num_classes = "classification", "sigmoid", 3

    out = torch.tensor([[0.5, -2.0, 9.0], [0.5, 1.5, -9.0]])
    obj = build_objective(Attributes(), {"mode": "auto", "tolerance": 0.05}, query=1)  # query from the dataset
    assert obj.prediction(out).tolist() == [0, 1] and obj.target(out).tolist() == [1, 0]
    t = obj.target(out)
    assert obj.loss(out, t, "logit").tolist() == [2.0, 1.5]  # -(2y*-1)·z: -(+1)(-2), -(-1)(1.5)
    # binary cross-entropy: softplus(-z) for y* = 1, softplus(z) for y* = 0
    assert obj.loss(out, t, "ce").tolist() == pytest.approx([math.log1p(math.exp(2.0)), math.log1p(math.exp(1.5))])
    assert obj.probability(out, t).tolist() == pytest.approx([1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(1.5))])
    assert obj.success(torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.1, 0.0]]), t).tolist() == [True, False]
    # target.query wins over the dataset's; a head with several outputs needs one
    assert build_objective(Attributes(), {"query": 2}, query=1).query == 2
    with pytest.raises(CfxError, match="target.query=<index>"):
        build_objective(Attributes(), {})
    with pytest.raises(CfxError, match="target.query=5 is not an output"):
        build_objective(Attributes(), {"query": 5})


def test_difference_mask():
    x = torch.zeros(1, 3, 9, 9)
    x_cf = x.clone()
    x_cf[0, :, 4, 4] = 1.0
    m = difference_mask(x_cf, x, dilation=3, threshold=0.15)
    assert m.sum() == 9 and m[0, 0, 3:6, 3:6].all()


@pytest.fixture(scope="module")
def oracle_metrics():
    from cfx_cli.models.small_cnn import zoo_oracle

    return OracleMetrics(zoo_oracle(ZOO_DIR / "synthetic_oracle"), SyntheticWorld())


def test_oracle_metrics_on_known_edits(oracle_metrics):
    world = oracle_metrics.world
    f = world.factors_for_indices("test", range(16), 0)
    x = world.render(f)
    target = torch.as_tensor(1 - f["shape"])
    ideal = world.ideal_counterfactual(f, shape=target.numpy())
    r = oracle_metrics(x, ideal, f, target, "classification")
    assert r["ideal_cf_l1"].max() < 1e-6 and r["oracle_flip"].mean() >= 0.95
    assert r["mnac"].mean() <= 0.1 and r["bg_changed"].sum() == 0
    # Change the background too: one more non-target factor, and a revealed "shortcut".
    bg = world.ideal_counterfactual(f, shape=target.numpy(), bg_colour=(f["bg_colour"] + 1) % 4)
    r2 = oracle_metrics(x, bg, f, target, "classification")
    assert r2["bg_changed"].mean() >= 0.95 and r2["mnac"].mean() >= 0.9
    assert (r2["ideal_cf_l1"] > 0.05).all()


def test_oracle_mae_of_a_regression_counterfactual(oracle_metrics):
    """The ideal counterfactual renders the target size: the oracle reads it within its own error; a
    counterfactual that leaves the image as it was is |size − target| away (a closed form from the factors)."""
    world = oracle_metrics.world
    f = world.factors_for_indices("test", range(16), 0)
    x = world.render(f)
    target = torch.full((16,), 0.8)
    ideal = world.ideal_counterfactual(f, size=np.full(16, 0.8))
    at_target = oracle_metrics(x, ideal, f, target, "regression")["oracle_error"]
    unchanged = oracle_metrics(x, x, f, target, "regression")["oracle_error"]
    closed_form = np.abs(f["size"] - 0.8)  # the oracle reads sizes to about 0.07 (normalised)
    assert at_target.mean() < 0.1 and np.abs(unchanged - closed_form).mean() < 0.1
    assert unchanged.mean() > 3 * at_target.mean()
    assert "oracle_error" not in oracle_metrics(x, x, f, torch.as_tensor(1 - f["shape"]), "classification")
