"""`cfx train WHAT`: train one model of the synthetic benchmark, measure it, write it to the zoo."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cfx_cli.config import choice
from cfx_cli.data.synthetic import SyntheticWorld
from cfx_cli.errors import CfxError
from cfx_cli.models.small_cnn import save_zoo_model
from cfx_cli.train import supervised


def world_from(cfg: DictConfig) -> SyntheticWorld:
    if (dataset := choice(cfg, "dataset")) != "synthetic":
        raise CfxError(f"dataset={dataset}: cfx train makes the synthetic benchmark's models (dataset=synthetic) "
                       f"or models of your images (dataset=folder)")
    d = OmegaConf.to_container(cfg.dataset, resolve=True)
    d.update(OmegaConf.to_container(cfg.trainable.world, resolve=True))
    return SyntheticWorld(image_size=d["image_size"], shapes=tuple(d["shapes"]), size_range=tuple(d["size_range"]),
                          rho=d.get("rho"))


def command_line() -> str:
    """The command that reproduces this run (for the model's config.json)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        # where the model and checkpoints go does not change the model: leave those out
        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.startswith(("trainable=", "out=", "work_dir=", "hydra."))]
    except ValueError:
        overrides = []
    what = [a for a in sys.argv if a.startswith("trainable=")]
    return " ".join(["cfx train", what[0].split("=", 1)[1] if what else "?", *overrides])


def check_device(cfg: DictConfig) -> None:
    """The device a model is trained on is the one its reproduction command records: never another."""
    device, kind = str(cfg.device), cfg.trainable.kind
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CfxError(f"device={device} but no CUDA device is visible (torch.cuda.is_available() is False); "
                       f"use device=cpu")
    if kind != "ddpm" and device != "cpu":
        raise CfxError(f"device={device}: cfx train {cfg.trainable.name} trains on the CPU (a small {kind}, "
                       f"minutes); drop device= or use device=cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CfxError(f"device={device!r} is not a training device; use cpu or cuda")


def output_folder(cfg: DictConfig) -> str:
    """Where the model goes: a new folder under outputs/ by default; the shipped zoo only when asked
    (``out=zoo``), so a quick try never overwrites the models the benchmark's numbers come from."""
    if str(cfg.out) == "zoo":
        from cfx_cli import ZOO_DIR

        return str(ZOO_DIR / cfg.trainable.name)
    return str(cfg.out)


def folder_images(cfg: DictConfig):
    """Every image of a folder dataset in memory, with its labels and class names."""
    from hydra.utils import instantiate

    from cfx_cli.errors import UnreadableItem

    ds = instantiate(cfg.dataset)
    xs, ys = [], []
    for i in range(len(ds)):
        try:
            b = ds.batch([i])
        except UnreadableItem as e:  # one bad file is skipped, and said
            print(f"cfx train: skipping {e.item} ({e.reason})", file=sys.stderr)
            continue
        xs.append(b["x"])
        ys.append(b["label"])
    if not xs:
        raise CfxError(f"dataset.root={cfg.dataset.root}: no readable image to train on")
    return ds, torch.cat(xs), torch.cat(ys)


def train_on_folder(cfg: DictConfig, out: str) -> dict:
    """`cfx train classifier|ddpm dataset=folder dataset.root=...`: your own images."""
    t = cfg.trainable
    ds, x, y = folder_images(cfg)
    info = {"name": t.name, "command": command_line(), "seed": int(cfg.seed),
            "train": OmegaConf.to_container(t, resolve=True), "image_size": int(x.shape[-1]),
            "dataset_root": str(cfg.dataset.root), "classes": list(ds.classes), "num_images": int(len(x))}
    if t.kind == "ddpm":
        from cfx_cli.train.ddpm import folder_images as batches, train_ddpm

        train_ddpm(None, out, cfg.work_dir, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                   decay_from=t.get("decay_from"), ema_decay=t.ema_decay, channels=tuple(t.channels), seed=cfg.seed,
                   threads=cfg.threads, device=cfg.device, command=info["command"],
                   images=batches(x, t.batch_size, hflip=bool(t.get("hflip", True))), image_size=int(x.shape[-1]),
                   info={k: info[k] for k in ("image_size", "dataset_root", "classes")})
        n = int(t.get("check_samples", 16))
        if n:  # a look at what it learnt, recorded beside the model
            from cfx_cli.train.ddpm import sample_check

            grid = sample_check(out, n=n, seed=int(cfg.seed))
            record = Path(out) / "train_info.json"
            record.write_text(json.dumps({**json.loads(record.read_text()), "sample_check": {
                "file": grid.name, "samples": n, "steps": 50}}, indent=1))
            info["sample_check"] = str(grid)
        print(f"wrote {out}" + (f" (samples: {info['sample_check']})" if info.get("sample_check") else ""))
        return info
    if t.kind != "classifier":
        raise CfxError(f"cfx train {t.name} dataset=folder: a folder trains a classifier or a ddpm "
                       f"(cfx train classifier|ddpm dataset=folder dataset.root=...)")
    if len(ds.classes) < 2 or (y < 0).any():
        raise CfxError(f"dataset.root={cfg.dataset.root}: a classifier needs one sub-folder per class (found "
                       f"{len(ds.classes)} class folder(s){' and images outside them' if (y < 0).any() else ''})")
    train_idx, held = supervised.split_held_out(len(x), float(t.get("held_out", 0.2)), int(cfg.seed))
    arch = str(t.get("arch", "small_cnn"))
    kwargs = {"num_outputs": len(ds.classes), **({"width": t.width} if arch == "small_cnn" else {})}
    model = supervised.train_on_images(x[train_idx], y[train_idx], len(ds.classes), steps=t.steps,
                                       batch_size=t.batch_size, lr=t.lr, width=t.width, seed=cfg.seed, arch=arch,
                                       hflip=bool(t.get("hflip", True)))
    with torch.no_grad():
        acc = float(torch.cat([model(x[held][i:i + 256]).argmax(1) for i in range(0, len(held), 256)]).eq(
            y[held]).float().mean())
    info.update(task="classification", quality={"held_out_accuracy": acc, "held_out_images": int(len(held))},
                input_size=None)
    save_zoo_model(model.net, out, arch, kwargs, **info)
    print(f"wrote {out}: held-out accuracy {acc:.3f} on {len(held)} images (classes: {', '.join(ds.classes)})")
    return info


def check_counts(cfg: DictConfig) -> None:
    """Counts (steps, batch sizes, ...) are whole numbers of at least 1: ``trainable.steps=abc`` or ``=-5`` is
    one line naming the key, not a traceback from deep in the loop."""
    for key in ("trainable.steps", "trainable.ae_steps", "trainable.batch_size", "threads", "eval_images"):
        v = OmegaConf.select(cfg, key, default=None)
        if v is None or (key == "threads" and v in (0, "0")):
            continue
        try:
            n = int(str(v)) if not isinstance(v, bool) else None
        except ValueError:
            n = None
        if n is None or n < 1:
            raise CfxError(f"{key}={v!r} is not a whole number of at least 1: give e.g. {key}=100")


def train(cfg: DictConfig) -> dict:
    t = cfg.trainable
    check_device(cfg)
    check_counts(cfg)
    out = output_folder(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if choice(cfg, "dataset") == "folder":
        return train_on_folder(cfg, out)
    if t.get("folder_only"):
        raise CfxError(f"cfx train {t.name} trains on your images: add dataset=folder dataset.root=<folder>")
    world = world_from(cfg)
    test_world = SyntheticWorld(image_size=world.image_size, shapes=world.shapes, size_range=world.size_range)
    info = {"name": t.name, "command": command_line(), "seed": int(cfg.seed),
            "train": OmegaConf.to_container(t, resolve=True), "image_size": world.image_size,
            "shapes": list(world.shapes)}
    if t.kind == "ldm":
        from cfx_cli.train.latent import train_latent_diffusion

        train_latent_diffusion(world, out, cfg.work_dir, ae_steps=t.ae_steps, steps=t.steps, batch_size=t.batch_size,
                               lr=t.lr, ae_lr=t.ae_lr, ae_channels=tuple(t.ae_channels),
                               latent_channels=t.latent_channels, kl_weight=t.kl_weight, channels=tuple(t.channels),
                               context_dim=t.context_dim, label_dropout=t.label_dropout, ema_decay=t.ema_decay,
                               decay_from=t.get("decay_from"), seed=cfg.seed, threads=cfg.threads,
                               command=info["command"])
        print(f"wrote {out}")
        return info
    if t.kind == "diffae":
        from cfx_cli import ZOO_DIR
        from cfx_cli.train.diffae import train_diffae

        ddpm = t.ddpm if t.ddpm else str(ZOO_DIR / "synthetic_ddpm")
        train_diffae(world, ddpm, out, cfg.work_dir, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                     unet_lr_scale=t.unet_lr_scale, z_dim=t.z_dim, width=t.width, ema_decay=t.ema_decay,
                     decay_from=t.get("decay_from"), min_snr_gamma=t.get("min_snr_gamma"), seed=cfg.seed,
                     threads=cfg.threads, command=info["command"])
        print(f"wrote {out}")
        return info
    if t.kind == "ddpm":
        from cfx_cli.train.ddpm import train_ddpm

        train_ddpm(world, out, cfg.work_dir, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                   decay_from=t.get("decay_from"),
                   ema_decay=t.ema_decay, channels=tuple(t.channels), seed=cfg.seed, threads=cfg.threads,
                   device=cfg.device, command=info["command"])
        print(f"wrote {out}")
        return info
    common = dict(steps=t.steps, batch_size=t.batch_size, lr=t.lr, width=t.width, seed=cfg.seed)
    n = int(cfg.eval_images)
    if t.kind == "classifier":
        adversarial = OmegaConf.to_container(t.adversarial, resolve=True) if t.get("adversarial") else None
        if adversarial:
            from cfx_cli.train.adversarial import check_budget

            check_budget(adversarial["norm"], adversarial["eps"], adversarial["steps"])
        model = supervised.train_classifier(world, input_size=t.input_size, adversarial=adversarial, **common)
        quality = supervised.evaluate_classifier(model, test_world, n, attack=adversarial)
        net, arch, kwargs = model.net, "small_cnn", {"num_outputs": len(world.shapes), "width": t.width}
        info.update(task="classification", classes=list(world.shapes), input_size=t.input_size)
    elif t.kind == "regressor":
        model = supervised.train_regressor(world, input_size=t.input_size, **common)
        quality = supervised.evaluate_regressor(model, test_world, n)
        net, arch, kwargs = model.net, "small_cnn", {"num_outputs": 1, "width": t.width}
        info.update(task="regression", input_size=t.input_size)
    elif t.kind == "oracle":
        net = supervised.train_oracle(world, **common)
        quality = supervised.evaluate_oracle(net, test_world, n)
        arch, kwargs = "factor_oracle", {"discrete": supervised.ORACLE_DISCRETE, "width": t.width}
    else:
        raise CfxError(f"trainable.kind={t.kind!r} is unknown; use ddpm, classifier, regressor or oracle")
    info["quality"] = quality
    save_zoo_model(net, out, arch, kwargs, **info)
    print(f"wrote {out}: " + ", ".join(f"{k}={v:.4f}" for k, v in quality.items()))
    return info

