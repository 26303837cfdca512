"""The one resumable training loop of the generative models (pixel DDPM, autoencoder, latent UNet, Diff-AE).

Step k draws everything it needs (images, noise, timesteps) from ``np.random.default_rng([seed, k])``,
so a killed run resumes from its last checkpoint and continues exactly as if it had not stopped.
The networks being trained get an EMA copy (``ema_decay``; None = none); the learning rate warms up
linearly, stays constant, then decays linearly to ``final_lr_fraction`` from ``decay_from``.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cfx_cli.errors import CfxError


def lr_factor(step: int, warmup: int, decay_from: int | None, steps: int, final: float) -> float:
    """Linear warm-up, constant, then (from ``decay_from``) linear decay to ``final`` at ``steps``.

    The rate at a step depends only on these numbers, so a run stopped and resumed with the
    same settings follows the same schedule.
    """
    factor = min(1.0, (step + 1) / warmup)
    if decay_from is not None and step >= decay_from:
        frac = (step - decay_from) / max(1, steps - decay_from)
        factor *= 1 - (1 - final) * min(1.0, frac)
    return factor


class Trainer:
    """Trains ``nets`` (name → module) on ``loss(step, rng) -> scalar``; ``export(ema_nets, step)`` writes
    the usable model (the EMA weights when ``ema_decay`` is set) at every checkpoint."""

    def __init__(self, nets: dict[str, nn.Module], work_dir: str | Path, steps: int, lr: float = 4e-4,
                 warmup: int = 200, decay_from: int | None = None, final_lr_fraction: float = 0.05,
                 ema_decay: float | None = 0.999, checkpoint_every: int = 200, grad_clip: float = 1.0,
                 lr_scale: dict[str, float] | None = None, weight_decay: float = 0.0, desc: str = "train",
                 identity: dict | None = None):
        """``identity``: what the run trains on (a folder's root, its classes); a work_dir whose checkpoint
        was made on something else is refused rather than continued."""
        self.nets, self.steps, self.lr = nets, int(steps), float(lr)
        self.warmup, self.decay_from, self.final = int(warmup), decay_from, float(final_lr_fraction)
        self.checkpoint_every, self.grad_clip, self.desc = int(checkpoint_every), grad_clip, desc
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ema_decay = ema_decay
        self.ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in nets.items()} if ema_decay else dict(nets)
        lr_scale = lr_scale or {}
        self.groups = [{"params": [p for p in m.parameters() if p.requires_grad], "scale": lr_scale.get(k, 1.0)}
                       for k, m in nets.items()]
        self.opt = torch.optim.AdamW([{"params": g["params"]} for g in self.groups], lr=self.lr,
                                     weight_decay=weight_decay)
        self.state_file = self.work_dir / "state.pt"
        self.start = 0
        self.identity = json.loads(json.dumps(identity, default=str)) if identity else None
        if self.state_file.exists():
            try:
                state = torch.load(self.state_file, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - weights_only refuses any pickle that is not plain tensors
                raise CfxError(f"work_dir={self.work_dir}: {self.state_file.name} is not a cfx training checkpoint "
                               f"({type(e).__name__}; cfx never unpickles other objects): delete it to start over, "
                               f"or give another work_dir") from None
            was = json.loads(state["identity"]) if state.get("identity") else None
            if self.identity and was and was != self.identity:
                diff = ", ".join(f"{k}={was.get(k)!r}" for k in sorted(set(was) | set(self.identity))
                                 if was.get(k) != self.identity.get(k))
                raise CfxError(f"work_dir={self.work_dir} holds the checkpoint of another run ({diff}): give this "
                               f"model its own work_dir (or delete that folder to start over)")
            for k, m in nets.items():
                m.load_state_dict(state["nets"][k])
                if ema_decay:
                    self.ema[k].load_state_dict(state["ema"][k])
            self.opt.load_state_dict(state["opt"])
            self.start = int(state["step"])

    def save(self, step: int, export: Callable) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        torch.save({"nets": {k: m.state_dict() for k, m in self.nets.items()},
                    "ema": {k: m.state_dict() for k, m in self.ema.items()} if self.ema_decay else {},
                    "opt": self.opt.state_dict(), "step": step,
                    **({"identity": json.dumps(self.identity)} if self.identity else {})}, tmp)
        tmp.replace(self.state_file)
        export(self.ema, step)

    def run(self, loss_fn: Callable[[int, np.random.Generator], torch.Tensor], export: Callable, seed: int = 0,
            log_every: int = 20) -> None:
        ema_params = [p for k in self.nets for p in self.ema[k].parameters()]
        params = [p for k in self.nets for p in self.nets[k].parameters()]
        trainable = [p for g in self.groups for p in g["params"]]
        log = open(self.work_dir / "loss.log", "a")
        bar = tqdm(range(self.start, self.steps), initial=self.start, total=self.steps, desc=self.desc,
                   mininterval=10)
        t0 = time.time()
        for step in bar:
            rng = np.random.default_rng([seed, step])
            loss = loss_fn(step, rng)
            factor = lr_factor(step, self.warmup, self.decay_from, self.steps, self.final)
            for group, spec in zip(self.opt.param_groups, self.groups):
                group["lr"] = self.lr * spec["scale"] * factor
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
            self.opt.step()
            if self.ema_decay:
                decay = min(self.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():  # one fused update of all EMA weights (one kernel per group, not per tensor)
                    torch._foreach_lerp_(ema_params, params, 1 - decay)
            if step % log_every == 0:
                log.write(f"{step} {loss.item():.5f} {time.time() - t0:.1f}\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % self.checkpoint_every == 0 or step + 1 == self.steps:
                self.save(step + 1, export)
        if self.start >= self.steps:
            export(self.ema, self.steps)


def step_noise(rng: np.random.Generator, shape, num_timesteps: int, device="cpu"):
    """A training step's noise and timesteps, from the step's generator (reproducible on any device)."""
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise = torch.randn(tuple(shape), generator=g).to(device)
    t = torch.randint(0, num_timesteps, (shape[0],), generator=g).to(device)
    return noise, t
