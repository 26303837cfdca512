"""Train and measure the synthetic benchmark's small supervised models.

Classifier (shape), size regressor and factor oracle, all on images rendered on
the fly (batch k's factors depend only on (seed, k)), then measured on freshly
rendered *test-split* images and saved to the zoo with the numbers and the
command that reproduces them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cfx_cli.data.synthetic import ALL_SHAPES, BACKGROUND_COLOURS, OBJECT_COLOURS, SyntheticWorld
from cfx_cli.models.explained import ExplainedModel
from cfx_cli.models.small_cnn import FactorOracle, SmallCNN

ORACLE_DISCRETE = {"shape": len(ALL_SHAPES), "obj_colour": len(OBJECT_COLOURS), "bg_colour": len(BACKGROUND_COLOURS)}


def _batches(world: SyntheticWorld, steps: int, batch_size: int, seed: int):
    for step in range(steps):
        f = world.sample(np.random.default_rng([seed, step]), batch_size)
        yield step, world.render(f), f


def _fit(model, loss_fn, world, steps, batch_size, lr, seed, desc, perturb=None, batches=None):
    """AdamW with a one-cycle rate over ``batches`` (``(step, x, targets)``; default: the synthetic world's)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    batches = _batches(world, steps, batch_size, seed) if batches is None else batches
    bar = tqdm(batches, total=steps, desc=desc, mininterval=5)
    for step, x, f in bar:
        if perturb is not None:  # adversarial training: fit the attacked batch
            x = perturb(x, f)
        loss = loss_fn(model(x), f)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().requires_grad_(False)


def global_shape(world: SyntheticWorld, labels) -> torch.Tensor:
    """Labels (indices into world.shapes) as indices into ALL_SHAPES."""
    return torch.as_tensor([world.shape_ids[int(v)] for v in np.asarray(labels)])


def _trainable(net, task: str, input_size: int | None) -> ExplainedModel:
    """The network behind the same preprocessing (e.g. a thumbnail) that it will be explained with."""
    model = ExplainedModel(net, task, input_size=input_size)
    model.net.requires_grad_(True)
    return model


def train_classifier(world: SyntheticWorld, steps=600, batch_size=128, lr=3e-3, width=32, seed=0, input_size=None,
                     adversarial: dict | None = None):
    """A shape classifier; ``adversarial`` ({norm, eps, steps}) trains it on PGD examples instead (Madry et al.)."""
    model = _trainable(SmallCNN(len(world.shapes), width), "classification", input_size)
    loss = lambda out, f: F.cross_entropy(out, torch.as_tensor(f["shape"]).long())  # noqa: E731
    perturb, desc = None, "train classifier"
    if adversarial:
        from cfx_cli.train.adversarial import adversarial_examples

        perturb = adversarial_examples(model, adversarial["norm"], adversarial["eps"], adversarial["steps"],
                                       torch.Generator().manual_seed(seed))
        desc = f"train classifier (PGD {adversarial['norm']} eps={adversarial['eps']})"
    return _fit(model, loss, world, steps, batch_size, lr, seed, desc, perturb)


def train_regressor(world: SyntheticWorld, steps=1500, batch_size=128, lr=3e-3, width=32, seed=0, input_size=None):
    model = _trainable(SmallCNN(1, width), "regression", input_size)
    loss = lambda out, f: F.mse_loss(out, torch.as_tensor(f["size"]).float())  # noqa: E731
    return _fit(model, loss, world, steps, batch_size, lr, seed, "train regressor")


def oracle_loss(out, f, world: SyntheticWorld):
    loss = F.cross_entropy(out["shape"], global_shape(world, f["shape"]))
    for k in ("obj_colour", "bg_colour"):
        loss = loss + F.cross_entropy(out[k], torch.as_tensor(f[k]).long())
    cont = torch.as_tensor(np.stack([f["size"], f["pos_x"], f["pos_y"]], 1)).float()
    return loss + 10 * F.mse_loss(out["continuous"], cont)


def train_oracle(world: SyntheticWorld, steps=1500, batch_size=128, lr=3e-3, width=32, seed=0):
    model = FactorOracle(ORACLE_DISCRETE, width)
    return _fit(model, lambda out, f: oracle_loss(out, f, world), world, steps, batch_size, lr, seed, "train oracle")


# ------------------------------------------------------------------ measuring
@torch.no_grad()
def _test_batch(world: SyntheticWorld, n: int, seed: int):
    f = world.factors_for_indices("test", range(n), seed)
    return world.render(f), f


def evaluate_classifier(model, world: SyntheticWorld, n=1000, seed=123, attack: dict | None = None) -> dict:
    """Accuracy on fresh test images, overall and where the background contradicts the shape; with
    ``attack`` ({norm, eps}) also the accuracy under a 20-step PGD attack of that budget and how well
    the input gradient aligns with the ideal shape change (``cfx_cli.train.adversarial``)."""
    x, f = _test_batch(world, n, seed)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    correct = pred == f["shape"]
    conflict = np.array([int(b) not in world.preferred_backgrounds(int(s)) for s, b in zip(f["shape"], f["bg_colour"])])
    out = {"accuracy": float(correct.mean()), "accuracy_bg_conflict": float(correct[conflict].mean()),
           "accuracy_bg_aligned": float(correct[~conflict].mean())}
    if attack:
        from cfx_cli.train.adversarial import gradient_alignment, robust_accuracy

        y = torch.as_tensor(f["shape"]).long()
        other = (f["shape"] + 1) % len(world.shapes)  # the next shape: the other one of two
        out[f"robust_accuracy_{attack['norm']}_{attack['eps']}"] = robust_accuracy(model, x, y, attack["norm"],
                                                                                  attack["eps"], seed=seed)
        out["gradient_alignment"] = gradient_alignment(model, x, torch.as_tensor(other).long(),
                                                       world.ideal_counterfactual(f, shape=other))
    return out


@torch.no_grad()
def evaluate_regressor(model, world: SyntheticWorld, n=1000, seed=123) -> dict:
    x, f = _test_batch(world, n, seed)
    return {"mae": float((model(x).reshape(-1) - torch.as_tensor(f["size"]).float()).abs().mean())}


@torch.no_grad()
def evaluate_oracle(model, world: SyntheticWorld, n=1000, seed=123) -> dict:
    x, f = _test_batch(world, n, seed)
    out = model(x)
    res = {"shape_accuracy": float((out["shape"].argmax(1) == global_shape(world, f["shape"])).float().mean())}
    for k in ("obj_colour", "bg_colour"):
        res[f"{k}_accuracy"] = float((out[k].argmax(1).numpy() == f[k]).mean())
    cont = out["continuous"].numpy()
    for i, k in enumerate(("size", "pos_x", "pos_y")):
        res[f"{k}_mae"] = float(np.abs(cont[:, i] - f[k]).mean())
    return res


# ------------------------------------------------------------------ your own images
def train_on_images(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps=300, batch_size=64, lr=3e-3,
                    width=32, seed=0, arch: str = "small_cnn", hflip: bool = True) -> ExplainedModel:
    """A classifier on images held in memory (a folder dataset's): a SmallCNN, or a torchvision-layout
    ``arch`` (resnet18/34/50, densenet121); random left-right flips as augmentation unless ``hflip`` is off
    (digits, text: anything with a handedness)."""
    from cfx_cli.models.small_cnn import ARCHITECTURES

    torch.manual_seed(seed)
    net = SmallCNN(num_classes, width) if arch == "small_cnn" else ARCHITECTURES[arch](num_outputs=num_classes)
    model = _trainable(net, "classification", None)

    def batches():
        for step in range(steps):
            rng = np.random.default_rng([seed, step])
            idx = torch.as_tensor(rng.integers(0, len(x), batch_size))
            flip = torch.as_tensor((rng.random(batch_size) < 0.5) & hflip).view(-1, 1, 1, 1)
            yield step, torch.where(flip, x[idx].flip(-1), x[idx]), y[idx]

    return _fit(model, lambda out, labels: F.cross_entropy(out, labels), None, steps, batch_size, lr, seed,
                "train classifier", batches=batches())


def split_held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / held-out indices: a seeded permutation, ``fraction`` (at least one image) held out."""
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(perm[k:]), np.sort(perm[:k])
