"""Real vs adversarial counterfactuals (issue 18): each sample's outcome, the set's rates, the grid's labels,
`cfx calibrate` choosing by real flips and refusing noise, and the progress bar inside a batch. Expected values
are worked out by hand from the rows given."""
import io
import types

import numpy as np
import pandas as pd
import pytest
import torch
from tqdm import tqdm

from cfx_cli.commands import calibrate as cal
from cfx_cli.job.explain import BatchProgress, expected_unet_calls
from cfx_cli.metrics.sample import outcomes
from cfx_cli.metrics.summary import summarise
from cfx_cli.models.counting import CostMeter
from cfx_cli.outputs import grid_label


def test_outcome_per_sample():
    success = [True, True, False, False]
    assert list(outcomes(success, [1.0, 0.0, 1.0, 0.0])) == ["real", "adversarial", "failed", "failed"]
    assert list(outcomes(success)) == ["success", "success", "failed", "failed"]  # no oracle
    assert list(outcomes([True, True], [np.nan, 1.0])) == ["success", "real"]  # an unread sample: no verdict
    # the oracle saw the target on the original already (the model had misread it): a confirmed flip is corrected,
    # an unconfirmed one adversarial (the edit took the image away from the target)
    assert list(outcomes([True, True, True, False], [1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0])) == \
        ["corrected", "real", "adversarial", "failed"]


def samples(**cols):
    n = len(next(iter(cols.values())))
    base = {"index": range(n), "label": [0] * n, "pred": [0] * n, "target": [1] * n, "cf_pred": [1] * n,
            "failed": [False] * n, "l1": [0.1] * n}
    return pd.DataFrame({**base, **cols})


def test_rates_count_every_sample():
    # 5 samples: real, adversarial, real, unsuccessful, failed (NaN image: no oracle reading)
    s = samples(success=[True, True, True, False, False], oracle_flip=[1.0, 0.0, 1.0, 0.0, np.nan],
                failed=[False, False, False, False, True])
    m = summarise(s, "classification")
    assert m["flip_rate"] == pytest.approx(3 / 5)
    assert m["real_flip_rate"] == pytest.approx(2 / 5) and m["adversarial_rate"] == pytest.approx(1 / 5)
    # regression: success = the model reached the target; real = the oracle's size within the tolerance too
    r = samples(success=[True, True, False, True], oracle_flip=[1.0, 0.0, 0.0, 1.0])
    m = summarise(r, "regression")
    assert m["success_rate"] == 0.75 and m["real_flip_rate"] == 0.5 and m["adversarial_rate"] == 0.25
    # misread originals (oracle_was_target): of 4 samples one real, two corrected, one adversarial
    s = samples(success=[True, True, True, True], oracle_flip=[1.0, 1.0, 1.0, 0.0], oracle_was_target=[0.0, 1.0, 1.0, 1.0])
    m = summarise(s, "classification")
    assert (m["real_flip_rate"], m["corrected_rate"], m["adversarial_rate"]) == (0.25, 0.5, 0.25)
    # a job folder written before oracle_was_target: every confirmed flip real, none corrected
    m = summarise(samples(success=[True, True], oracle_flip=[1.0, 0.0]), "classification")
    assert (m["real_flip_rate"], m["corrected_rate"], m["adversarial_rate"]) == (0.5, 0.0, 0.5)
    # no oracle (a real dataset): no such rates at all, rather than zeros
    m = summarise(samples(success=[True, False]), "classification")
    assert "real_flip_rate" not in m and "adversarial_rate" not in m and m["flip_rate"] == 0.5


def test_grid_label_names_classes_and_outcome():
    row = {"index": 3, "label": 1, "target": 0, "cf_pred": 0, "label_name": "square", "target_name": "circle",
           "cf_pred_name": "circle", "outcome": "adversarial", "success": True}
    assert grid_label(row) == "#3  square -> circle\nadversarial (got circle)"
    old = {"index": 0, "label": 0.2, "target": 0.5, "cf_pred": 0.1, "success": False}  # regression, older job
    assert grid_label(old) == "#0  0.2 -> 0.5\nfailed (got 0.1)"


# --------------------------------------------------------------------------- progress inside a batch
def calls(meter: CostMeter, k: int, n: int):
    for _ in range(k):
        meter.add("unet", "forward", n)


def test_progress_moves_with_the_unet_calls_of_the_batch():
    Method = type("Method", (), {"unet_calls": lambda self: 6})  # what a method declares (tests/test_methods.py)
    assert expected_unet_calls(Method()) == 6.0 and expected_unet_calls(object()) is None
    bar = tqdm(total=6, file=io.StringIO())
    meter = CostMeter()
    p = BatchProgress(bar, meter, Method(), every=0.0)
    p.start(4)
    meter.start(4)
    calls(meter, 3, 4)
    assert bar.n == pytest.approx(4 * 3 / 6)  # each of the 4 samples half done
    calls(meter, 5, 4)
    assert bar.n == pytest.approx(4 * 0.99)  # 8 calls > 6: capped until the batch ends
    meter.stop()
    p.finish()
    assert bar.n == 4
    # the next batch uses what the first one cost: 8 calls per counterfactual
    p.start(2)
    meter.start(2)
    calls(meter, 2, 2)
    assert bar.n == pytest.approx(4 + 2 * 2 / 8)


def test_progress_without_an_estimate_counts_calls_then_learns():
    bar = tqdm(total=4, file=io.StringIO())
    meter = CostMeter()
    p = BatchProgress(bar, meter, None, every=0.0)
    p.start(2)
    meter.start(2)
    calls(meter, 5, 2)
    assert bar.n == 0 and "UNet calls in this batch: 5" in bar.postfix
    p.finish()
    p.start(2)
    meter.start(2)
    calls(meter, 1, 2)
    meter.add("unet", "backward", 2)  # a backward pass through the UNet is a call too
    assert bar.n == pytest.approx(2 + 2 * 2 / 5)


# --------------------------------------------------------------------------- cfx calibrate's choice
class FakeData:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, idx):
        return {"x": torch.zeros(len(idx), 3, 4, 4), "index": list(idx), "factors": {}}


class FakeExplainer:
    """Stands in for the API's Explainer: per strength, the mean edit size (l1), which samples flip the model
    and which of those the oracle confirms (``oracle_on`` False: no oracle, a real dataset)."""
    table: dict = {}
    oracle_on = True

    def __init__(self, overrides, device="cpu"):
        value = float(overrides[-1].split("[")[1].rstrip("]"))
        self.l1, self.flips, real = self.table[value]
        self.dataset, self.device = FakeData(len(self.flips)), "cpu"
        oracle = (lambda x, x_cf, factors, target, task, tol: {"oracle_flip": np.array(real, float)}) \
            if self.oracle_on else None
        self.parts = {"meter": CostMeter(), "method": None, "oracle": oracle,
                      "model": types.SimpleNamespace(task="classification"), "objective": object()}

    def explain(self, x, idx):
        return types.SimpleNamespace(x_cf=x + 2 * self.l1, success=torch.tensor(self.flips),
                                     failed=torch.zeros(len(x), dtype=torch.bool), target=torch.ones(len(x)),
                                     cost={"nfe_unet": torch.full((len(x),), 10)})


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(cal, "Explainer", FakeExplainer)
    FakeExplainer.oracle_on = True
    return FakeExplainer


def test_calibrate_counts_real_flips_and_refuses_noise(fake, capsys):
    T, F = True, False
    fake.table = {1.0: (0.010, [T, T, F, F], [1, 0, 0, 0]),
                  2.0: (0.012, [T, T, T, T], [1, 1, 0, 0]),   # the classifier flips all, the oracle 2: not 0.8
                  3.0: (0.050, [T, T, T, T], [1, 1, 1, 1])}   # all real, but l1 4.2× that of 2: noise
    assert cal.calibrate(["debug=fast"], [3.0, 1.0, 2.0], 0.8, 4) is None
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["method.scales=[1.0]", "method.scales=[2.0]", "method.scales=[3.0]"]
    assert "rate 1.00  real 0.50" in lines[1] and "⚠ noise: l1 4.2× that of 2" in lines[2]
    assert "the oracle confirms only 0.50" in err and "jump in size" in err and "between 2 and 3" in err
    # a value whose real flips reach the rate without a jump is chosen
    fake.table[3.0] = (0.020, [T, T, T, T], [1, 1, 1, 1])
    assert cal.calibrate(["debug=fast"], [1.0, 2.0, 3.0], 0.8, 4) == "method.scales=[3.0]"
    capsys.readouterr()
    # no oracle: the classifier's flips decide (2 reaches 0.8)
    fake.oracle_on = False
    assert cal.calibrate(["debug=fast"], [1.0, 2.0, 3.0], 0.8, 4) == "method.scales=[2.0]"
    assert "real" not in capsys.readouterr().out
