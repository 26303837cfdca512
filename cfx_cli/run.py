"""One job: build the parts from the config, explain every image, write the job folder."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import SampleRNG
from cfx_cli.metrics.cost import PeakMemory
from cfx_cli.metrics.sample import OracleMetrics, distances
from cfx_cli.metrics.summary import summarise
from cfx_cli.objectives import build_objective
from cfx_cli.outputs import JobWriter, diff_image, read_samples


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CfxError(f"device={name} but no CUDA device is visible (torch.cuda.is_available() is False); "
                       f"use device=auto or device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CfxError(f"device={name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None


def explained_model(cfg: DictConfig):
    """The regressor when one is chosen (``regressor=...`` switches the job to regression), else the classifier."""
    node, key = (cfg.regressor, "regressor") if cfg.get("regressor") else (cfg.get("classifier"), "classifier")
    if not node:
        raise CfxError("no explained model: choose classifier=<name> or regressor=<name>")
    model = instantiate(node)
    return model, key


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    if not 0 <= shard < num_shards:
        raise CfxError(f"data.shard={shard} must lie in 0..{num_shards - 1} (data.num_shards={num_shards})")
    return list(range(shard, n, num_shards))


def build(cfg: DictConfig, device: torch.device) -> dict:
    """Every part of a job, built once."""
    dataset = instantiate(cfg.dataset)
    model, model_key = explained_model(cfg)
    model = model.to(device)
    objective = build_objective(model.task, OmegaConf.to_container(cfg.target, resolve=True))
    diffusion = instantiate(cfg.diffusion).to(device)
    perceptual = None
    if float(cfg.method.get("lambda_perc", 0) or 0) > 0:
        from cfx_cli.models.perceptual import VGGPerceptual

        perceptual = VGGPerceptual(cfg.method.get("perceptual_weights")).to(device)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method_cfg.pop("name", None)
    method_cfg.pop("perceptual_weights", None)
    method = instantiate(method_cfg, diffusion=diffusion, model=model, objective=objective, perceptual=perceptual)
    oracle = None
    if getattr(dataset, "has_factors", False) and cfg.metrics.get("oracle"):
        oracle = OracleMetrics(instantiate(cfg.metrics.oracle).to(device), dataset.world,
                               size_tol=cfg.metrics.size_tol, pos_tol=cfg.metrics.pos_tol)
    return {"dataset": dataset, "model": model, "model_key": model_key, "objective": objective,
            "diffusion": diffusion, "method": method, "oracle": oracle}


def _rows(batch, pred, target, cf_pred, result, failed, dist, oracle_vals, seconds, peak_mib, task):
    rows = []
    for i, index in enumerate(batch["index"]):
        row = {"index": index, "id": batch["id"][i],
               "label": batch["label"][i].item() if task == "classification" else batch["value"][i].item(),
               "pred": pred[i].item(), "target": target[i].item(), "cf_pred": cf_pred[i].item(),
               "success": bool(result.success[i]) and not bool(failed[i]), "failed": bool(failed[i]),
               "l1": dist["l1"][i], "l2": dist["l2"][i]}
        for k, v in (oracle_vals or {}).items():
            row[k] = v[i]
        for k, v in result.info.items():
            row[k] = v[i].item()
        row.update(nfe_unet=int(result.nfe_unet[i]), nfe_model=int(result.nfe_model[i]), seconds=seconds,
                   peak_mem_mib=round(peak_mib, 1))
        rows.append(row)
    return rows


def job(cfg: DictConfig, job_dir: str | Path) -> dict:
    """Run (or resume) one job into ``job_dir``; returns its set-level metrics."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    writer = JobWriter(job_dir)
    started = time.time()
    writer.status(state="running", started=writer.read_status().get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
                  error=None, device=str(device))
    try:
        parts = build(cfg, device)
        dataset, model, objective, method = parts["dataset"], parts["model"], parts["objective"], parts["method"]
        task = model.task
        indices = shard_indices(len(dataset), cfg.data.shard, cfg.data.num_shards)
        done = writer.done_indices()
        todo = [i for i in indices if i not in done]
        writer.status(total=len(indices), resumed_from=len(done & set(indices)), task=task)
        bs = int(cfg.batch_size)
        bar = tqdm(total=len(indices), initial=len(indices) - len(todo), desc=f"{cfg.method.name}", unit="cf")
        for start in range(0, len(todo), bs):
            batch = dataset.batch(todo[start:start + bs])
            x = batch["x"].to(device)
            t0 = time.time()
            with PeakMemory(device) as peak:
                with torch.no_grad():
                    out = model(x)
                    pred, target = objective.prediction(out), objective.target(out)
                result = method.explain(x, target, SampleRNG(cfg.seed, batch["index"], device))
                failed = ~torch.isfinite(result.x_cf).flatten(1).all(1)
                x_cf = torch.where(failed.view(-1, 1, 1, 1), x, result.x_cf)  # keep the file valid; row says failed
                with torch.no_grad():
                    cf_pred = objective.prediction(model(x_cf))
            seconds = (time.time() - t0) / len(x)
            oracle_vals = None
            if parts["oracle"] is not None:
                oracle_vals = parts["oracle"](x, x_cf, batch["factors"], target, task,
                                              getattr(objective, "tolerance", 0.05))
            rows = _rows(batch, pred, target, cf_pred, result, failed.cpu(), distances(x, x_cf), oracle_vals,
                         seconds, peak.mib, task)
            images = {"original": x, "counterfactual": x_cf,
                      "diff": torch.stack([diff_image(a, b) for a, b in zip(x, x_cf)])}
            images.update({k: v for k, v in result.extras.items()})
            writer.add(rows, images)
            bar.update(len(x))
            writer.status(written=len(indices) - len(todo) + start + len(x))
        bar.close()
        samples = read_samples(writer.dir)
        samples = samples[samples["index"].isin(indices)]
        metrics = summarise(samples, task)
        writer.write_metrics(metrics)
        writer.write_grid()
        writer.status(state="done", written=len(samples), failed_samples=int(metrics["num_failed"]),
                      seconds=round(time.time() - started, 2), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return metrics
    except BaseException as e:  # record why, then let the CLI report it
        writer.status(state="failed", error=f"{type(e).__name__}: {e}".strip()[:2000])
        raise


def headline(metrics: dict[str, float]) -> str:
    keys = ["flip_rate", "success_rate", "mae_to_target", "l1", "mnac", "ideal_cf_l1", "shortcut_reveal_rate",
            "nfe_unet", "seconds_per_cf", "num_failed"]
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics and not np.isnan(metrics[k]))
