"""Set-level metrics from samples.csv rows (one job, or the merged shards of one job)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cfx_cli.metrics.sample import outcomes

# Column of samples.csv -> name of its mean in metrics.csv.
MEANS = {"l1": "l1", "l2": "l2", "mnac": "mnac", "ideal_cf_l1": "ideal_cf_l1",
         "bg_changed": "shortcut_reveal_rate", "oracle_flip": "oracle_flip_rate",
         "nfe_unet": "nfe_unet", "nfe_unet_backward": "nfe_unet_backward", "nfe_model": "nfe_model",
         "nfe_model_backward": "nfe_model_backward", "nfe_robust_model": "nfe_robust_model",
         "nfe_robust_model_backward": "nfe_robust_model_backward", "nfe_decoder": "nfe_decoder",
         "nfe_decoder_backward": "nfe_decoder_backward", "pgd_iterations": "pgd_iterations",
         "iterations": "iterations", "cout": "cout", "lpips": "lpips", "oracle_error": "oracle_mae",
         "seconds": "seconds_per_cf"}
# Column -> name of its maximum: the peak memory of the job's largest batch.
MAXES = {"peak_mem_mib": "peak_mem_mib"}


def summarise(samples: pd.DataFrame, task: str) -> dict[str, float]:
    """Headline metrics. Rates are over all samples (a failed sample counts as not flipped);
    distances and costs are means over the samples that did not fail."""
    n = len(samples)
    failed = samples["failed"].astype(bool) if "failed" in samples else pd.Series(False, index=samples.index)
    ok = samples[~failed]
    res: dict[str, float] = {"num_samples": float(n), "num_failed": float(failed.sum())}
    success = samples["success"].astype(float).where(~failed, 0.0)
    res["flip_rate" if task == "classification" else "success_rate"] = float(success.mean()) if n else np.nan
    rate = "flip_rate" if task == "classification" else "success_rate"
    for col in ("success_pre_explanation", "success_final"):  # ACE: both of its images judged
        if col in samples and n:
            res[f"{rate}_{col.removeprefix('success_')}"] = float(samples[col].astype(float).where(~failed, 0.0).mean())
    res.update(outcome_rates(samples, success))
    if task == "regression" and len(ok):
        res["mae_to_target"] = float((ok["cf_pred"] - ok["target"]).abs().mean())
        res["mae_to_target_before"] = float((ok["pred"] - ok["target"]).abs().mean())
    for col, name in MEANS.items():
        if col in ok and len(ok) and ok[col].notna().any():
            res[name] = float(ok[col].astype(float).mean())
    res.update(closeness(samples[~failed]))
    if "mnac" in ok and "success" in ok and ok["mnac"].notna().any():  # the papers': successful counterfactuals
        v = pd.to_numeric(ok.loc[ok["success"].astype(str) == "True", "mnac"], errors="coerce").dropna()
        res["mnac_successful"] = float(v.mean()) if len(v) else np.nan
    for col, name in MAXES.items():
        if col in samples and samples[col].notna().any():
            res[name] = float(samples[col].astype(float).max())
    return res


def outcome_rates(samples: pd.DataFrame, success: pd.Series | None = None) -> dict[str, float]:
    """Where the oracle read every counterfactual (``oracle_flip``), over all samples: ``real_flip_rate`` (the
    model flipped and the oracle confirms that the edit made the image the target; regression: the target
    reached, the oracle's size within the tolerance), ``corrected_rate`` (confirmed, but the oracle saw the
    target on the original already: a misread original, ``oracle_was_target``; 0 where a job did not record it)
    and ``adversarial_rate`` (the model flipped, the oracle does not agree); none without the oracle."""
    if "oracle_flip" not in samples or not len(samples):
        return {}
    if success is None:
        failed = samples["failed"].astype(str) == "True" if "failed" in samples else False
        success = (samples["success"].astype(str) == "True") & ~failed
    confirmed = pd.to_numeric(samples["oracle_flip"], errors="coerce")
    flipped = success.astype(float) > 0.5
    known = confirmed.notna() | ~flipped  # an unsuccessful sample is failed with or without the oracle
    if not known.all():
        return {}
    was = pd.to_numeric(samples["oracle_was_target"], errors="coerce") if "oracle_was_target" in samples else None
    kinds = outcomes(flipped.to_numpy(), confirmed.to_numpy(), None if was is None else was.to_numpy())
    return {f"{name}_rate": float((kinds == kind).mean())
            for name, kind in (("real_flip", "real"), ("corrected", "corrected"), ("adversarial", "adversarial"))}


def closeness(samples: pd.DataFrame) -> dict[str, float]:
    """FVA and FS over the successful counterfactuals (DiME/ACE count only those), S3 over the correctly
    classified originals (ACE), from the per-sample ``fva``/``fs``/``s3`` columns; NaN when none is left."""
    res = {}
    ok = samples["success"].astype(str) == "True" if "success" in samples else pd.Series(False, index=samples.index)
    for col in ("fva", "fs"):
        if col in samples and samples[col].notna().any():
            v = pd.to_numeric(samples.loc[ok, col], errors="coerce").dropna()
            res[col] = float(v.mean()) if len(v) else np.nan
    if "s3" in samples and samples["s3"].notna().any() and {"label", "pred"} <= set(samples):
        correct = pd.to_numeric(samples["label"], errors="coerce") == pd.to_numeric(samples["pred"], errors="coerce")
        v = pd.to_numeric(samples.loc[correct, "s3"], errors="coerce").dropna()
        res["s3"] = float(v.mean()) if len(v) else np.nan
    return res


def to_long(metrics: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())})


def finite(v) -> bool:
    """A metric's value that is a finite number (None, NaN, inf: no value)."""
    return v is not None and isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))
