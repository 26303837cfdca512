"""The Python API, for notebooks: the parts of a job from a config (or your own model), explained batch
by batch through the same code as `cfx run` (``cfx_cli.job.explain.explain_batch``), with no job folder.

    from cfx_cli.api import Explainer
    ex = Explainer(["method=fastdime"])                   # any `cfx run` overrides; device="auto"
    x, idx = ex.images(range(8))                           # or your own N×C×H×W tensor in [-1, 1]
    out = ex.explain(x, idx)                               # out.x_cf, out.success, out.cost["nfe_unet"], ...

    Explainer(["dataset=folder", "dataset.root=..."], model=my_net, task="classification",
              normalize="imagenet")                        # any nn.Module as the explained model

``indices`` seed each sample's noise as the dataset index does in `cfx run`: the same (seed, index)
gives the same counterfactual as the job (tested).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from cfx_cli.config import compose
from cfx_cli.job.build import JobParts, fit_defaults, resolve_device
from cfx_cli.job.explain import BatchExplanation, explain_batch

__all__ = ["Explainer", "compose"]


class Explainer:
    """Every part of a job, built once. ``model``: an ``nn.Module`` to explain instead of the config's
    classifier/regressor, wrapped with its preprocessing (``input_size``, ``normalize``: none |
    zero_one | imagenet) and its ``task``; it takes [-1, 1] images at the generative model's size."""

    def __init__(self, overrides: Sequence[str] | DictConfig = (), device: str = "auto", model: nn.Module | None = None,
                 task: str = "classification", input_size: int | None = None, normalize: str = "none",
                 head: str = "softmax"):
        self.cfg = overrides if isinstance(overrides, DictConfig) else compose(overrides)
        self.notes = fit_defaults(self.cfg)  # as `cfx run` does (e.g. no perceptual term without its weights)
        self.device = resolve_device(device)
        explained = None
        if model is not None:
            from cfx_cli.models.explained import ExplainedModel

            explained = model if isinstance(model, ExplainedModel) else ExplainedModel(
                model, task, input_size=input_size, normalize=normalize, head=head)
        torch.manual_seed(int(self.cfg.seed))
        self.parts = JobParts(self.cfg, self.device, model=explained).all()

    @property
    def dataset(self):
        return self.parts["dataset"]

    def images(self, indices) -> tuple[Tensor, list[int]]:
        """The config's dataset images at ``indices`` (on the explainer's device) and the indices."""
        batch = self.dataset.batch(list(indices))
        return batch["x"].to(self.device), list(batch["index"])

    def explain(self, x: Tensor, indices: Sequence[int] | None = None, seed: int | None = None) -> BatchExplanation:
        """Counterfactuals of ``x`` (N×C×H×W in [-1, 1]); ``indices`` (default 0..N−1) and ``seed`` (default
        the config's) choose each sample's noise. Returns the x_cf, pred, target, cf_pred, success, failed,
        the cost per sample (``cost['nfe_unet']``, ...) and the method's extras and info."""
        indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
        if len(indices) != len(x):
            raise ValueError(f"{len(indices)} indices for {len(x)} images")
        seed = int(self.cfg.seed) if seed is None else int(seed)
        return explain_batch(self.parts, x.to(self.device), indices, seed, self.device)
