"""Issue 18: the defaults make REAL counterfactuals, not adversarial ones.

A counterfactual is real when the classifier flips to the target (``success``) and the synthetic benchmark's
factor oracle reads the target shape on it (``oracle_flip``); a flip the oracle does not confirm is
adversarial. Both jobs run as `cfx run` composes them (conf/tuning/, conf/debug/): the
test names no tuned value itself.
"""
import pandas as pd
import pytest
import torch

from conftest import cfx

# DiME with its synthetic tuning (conf/tuning/dime_synthetic_ddpm.yaml: 100 steps, tau 30, scales 20/30/45) on the
# default job's 32 images, seed 0: `cfx run method=dime` at commit de16d01 (2026-12-06), mean ideal_cf_l1 0.0224
# (flip 1.00, real flip 0.59, 465 UNet calls per image, 151 s on 2 loaded CPU cores: too slow to run here).
DIME_IDEAL_CF_L1 = 0.0224


def _job(tmp_path, *overrides):
    folder = tmp_path / "job"
    # One torch thread for the job: on 2 cores shared with other work, 2 threads oversubscribe them (the 16-image
    # job measured 83 s with 2 threads against 19 s with 1, load 5-6); the images are the job's either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfx("run", "device=cpu", *overrides, f"hydra.run.dir={folder}")
    finally:
        torch.set_num_threads(threads)
    samples = pd.read_csv(folder / "samples.csv")
    metrics = dict(pd.read_csv(folder / "metrics.csv").values)
    real = (samples["success"].astype(bool) & (samples["oracle_flip"] > 0.5)).mean()
    return samples, metrics, real


def test_default_job_makes_real_counterfactuals(tmp_path):
    """`cfx run` as shipped (FastDiME, 32 test images, seed 0): flip >= 0.9, real flip >= 0.9, closer to the
    ideal counterfactual than DiME, <= 120 UNet calls per image. The whole default job: 25-40 s on one thread of 2 shared CPU cores."""
    samples, metrics, real = _job(tmp_path)
    assert len(samples) == 32 and not samples["failed"].any()
    assert metrics["flip_rate"] >= 0.9, metrics
    assert real >= 0.9, samples[["index", "success", "oracle_flip", "l1"]]
    assert metrics["ideal_cf_l1"] <= DIME_IDEAL_CF_L1, metrics
    assert samples["nfe_unet"].mean() <= 120, samples["nfe_unet"].describe()


@pytest.mark.parametrize("extra", [[], ["method.variant=2+"]], ids=["fastdime", "fastdime-2+"])
def test_debug_fast_makes_real_counterfactuals(tmp_path, extra):
    """`cfx run debug=fast` (4 images, a job in seconds): real flip >= 0.75 and no noise image (every l1 <= 0.05)."""
    samples, _, real = _job(tmp_path, "debug=fast", *extra)
    assert len(samples) == 4
    assert real >= 0.75, samples[["index", "success", "oracle_flip", "l1"]]
    assert (samples["l1"] <= 0.05).all(), samples[["index", "success", "oracle_flip", "l1"]]
