"""The Python API returns what `cfx run` writes, for the same seed and images, with no job folder."""
import numpy as np
import pandas as pd
import torch
from PIL import Image

from cfx_cli import ZOO_DIR
from cfx_cli.api import Explainer
from cfx_cli.models.explained import zoo_model
from cfx_cli.outputs import to_uint8
from cfx_cli.job.loop import job

OVERRIDES = ["debug=fast", "device=cpu"]


def test_api_gives_the_jobs_counterfactuals(tmp_path, compose):
    job(compose(OVERRIDES), tmp_path / "job")
    samples = pd.read_csv(tmp_path / "job" / "samples.csv").sort_values("index")

    ex = Explainer(OVERRIDES, device="cpu")
    x, idx = ex.images(range(4))
    out = ex.explain(x, idx)
    assert out.x_cf.shape == x.shape and list(out.success.shape) == [4]
    assert out.cf_pred.tolist() == samples["cf_pred"].tolist()
    assert out.success.tolist() == samples["success"].tolist()
    assert out.cost["nfe_unet"].tolist() == samples["nfe_unet"].tolist()
    for i in idx:  # the very pixels the job saved
        saved = np.asarray(Image.open(tmp_path / "job" / "images" / "counterfactual" / f"{i}.png"))
        assert np.array_equal(to_uint8(out.x_cf[i]), saved)
    # another seed: other noise, other images
    other = ex.explain(x, idx, seed=1)
    assert (other.x_cf - out.x_cf).abs().max() > 0.05


def test_api_explains_a_module_passed_directly():
    """Your own nn.Module (here the shipped classifier's bare network) gives what its config gives."""
    net = zoo_model(ZOO_DIR / "synthetic_shape", "classification").net
    direct = Explainer(OVERRIDES, device="cpu", model=net, task="classification")
    configured = Explainer(OVERRIDES, device="cpu")
    x, idx = configured.images(range(2))
    a, b = direct.explain(x, idx), configured.explain(x, idx)
    torch.testing.assert_close(a.x_cf, b.x_cf)
    assert a.success.tolist() == b.success.tolist()


def test_calibrate_picks_the_smallest_value_reaching_the_rate():
    from conftest import cfx

    # τ = 20 of debug=fast's 50 steps: at its own τ = 25 the DDPM redraws some shapes unguided, so that a
    # scale of 0.001 already flips 2 of 4 images
    proc = cfx("calibrate", "debug=fast", "device=cpu", "method.tau=20", "--values", "20", "0.001", "--rate", "0.5",
               "--images", "4")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("method.scales=[0.001]") and "rate 0.00" in lines[0]  # tried from the smallest
    assert lines[-1] == "use: method.scales=[20.0]"
    none = cfx("calibrate", "debug=fast", "device=cpu", "method.tau=20", "--values", "0.001", "--rate", "0.5",
               "--images", "2",
               check=False)
    assert none.returncode == 1 and "no value reached rate 0.5" in none.stderr
