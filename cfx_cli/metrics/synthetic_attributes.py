"""The synthetic benchmark's factors as binary attributes, so that MNAC and CD (cfx_cli/metrics/attributes.py)
work on it as on CelebA's 40 attributes: the shipped factor oracle is the attribute oracle, and the training
split's factors are the training labels (CD's reference correlations).

Attributes, in this order: ``shape=<s>`` for each shape of the world, ``obj_colour=<k>``, ``bg_colour=<k>``
(one-hot), ``large`` (normalised size > 0.5), ``right`` (pos_x > 0.5), ``low`` (pos_y > 0.5). Scores are
centred on 0: a discrete attribute scores its softmax probability − 0.5, a continuous one its reading − 0.5,
so that ``threshold: 0`` binarises them. The queried attribute is the shape of the world's second class
(``shape=square`` for circle/square) for a classifier, ``large`` for the size regressor.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from cfx_cli.data.synthetic import ALL_SHAPES, BACKGROUND_COLOURS, OBJECT_COLOURS, SyntheticWorld


def attribute_names(shapes) -> list[str]:
    return ([f"shape={s}" for s in shapes] + [f"obj_colour={k}" for k in range(len(OBJECT_COLOURS))]
            + [f"bg_colour={k}" for k in range(len(BACKGROUND_COLOURS))] + ["large", "right", "low"])


class SyntheticAttributeOracle(nn.Module):
    """The factor oracle's readings as N×A attribute scores (see the module docstring)."""

    def __init__(self, oracle: nn.Module, shapes=("circle", "square")):
        super().__init__()
        self.oracle = oracle
        self.shapes = tuple(shapes)
        self.shape_ids = [ALL_SHAPES.index(s) for s in self.shapes]
        self.names = attribute_names(self.shapes)

    def query_for(self, task: str) -> int:
        return self.names.index("large" if task == "regression" else f"shape={self.shapes[-1]}")

    def forward(self, x: Tensor) -> Tensor:
        out = self.oracle(x)
        shape = out["shape"].softmax(1)[:, self.shape_ids]
        cont = out["continuous"]
        return torch.cat([shape, out["obj_colour"].softmax(1), out["bg_colour"].softmax(1), cont[:, :3]], 1) - 0.5


def attribute_oracle(path: str, shapes=("circle", "square"), key: str = "metrics.evaluate.attributes.oracle.path"):
    from cfx_cli.models.small_cnn import zoo_oracle

    return SyntheticAttributeOracle(zoo_oracle(path, key=key), shapes)


def train_labels(shapes=("circle", "square"), size_range=(0.16, 0.30), image_size: int = 32, num_images: int = 5000,
                 seed: int = 0, rho: float | None = None) -> np.ndarray:
    """The attributes of the first ``num_images`` items of the training split (N×A, 0/1), from their factors."""
    world = SyntheticWorld(image_size=image_size, shapes=tuple(shapes), size_range=tuple(size_range), rho=rho)
    f = world.factors_for_indices("train", range(int(num_images)), int(seed))
    onehot = lambda v, k: np.eye(k, dtype=np.int8)[np.asarray(v, dtype=int)]  # noqa: E731
    return np.concatenate([onehot(f["shape"], len(world.shapes)), onehot(f["obj_colour"], len(OBJECT_COLOURS)),
                           onehot(f["bg_colour"], len(BACKGROUND_COLOURS)),
                           np.stack([f["size"] > 0.5, f["pos_x"] > 0.5, f["pos_y"] > 0.5], 1).astype(np.int8)], 1)
