"""The synthetic benchmark: images rendered from known factors.

Every image is a single anti-aliased shape on a flat background, drawn from
factors (shape, size, object colour, background colour, position). Because the
renderer is known, the *ideal* counterfactual of an image is simply the same
factors with only the target factor changed, which gives metrics that no real
dataset allows.

Rendering uses signed distance functions, so a batch of thousands of images is a
handful of vectorised tensor operations. Shapes have equal area for equal
``size`` so that size is a property independent of shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cfx_cli.errors import CfxError

ALL_SHAPES = ("circle", "square", "triangle")
OBJECT_COLOURS = ((0.95, 0.85, 0.20), (0.20, 0.85, 0.95), (0.95, 0.50, 0.75))
BACKGROUND_COLOURS = ((0.10, 0.15, 0.40), (0.10, 0.32, 0.15), (0.38, 0.10, 0.12), (0.30, 0.30, 0.30))
SPLITS = {"train": 0, "val": 1, "test": 2}
FACTOR_NAMES = ("shape", "size", "obj_colour", "bg_colour", "pos_x", "pos_y")

# Half-extent multipliers that give every shape the area of a circle of radius s.
_SQUARE_HALF = math.sqrt(math.pi) / 2  # square of half side a: 4a^2 = pi s^2
_TRIANGLE_SIDE = math.sqrt(4 * math.pi / math.sqrt(3))  # equilateral: sqrt(3)/4 L^2 = pi s^2


@dataclass
class SyntheticWorld:
    """The factor distribution and the renderer of one synthetic benchmark."""

    image_size: int = 32
    shapes: tuple[str, ...] = ("circle", "square")
    size_range: tuple[float, float] = (0.16, 0.30)  # half-extent, fraction of the image side
    rho: float | None = None  # background-shape correlation of a biased split (None: independent)
    n_obj_colours: int = len(OBJECT_COLOURS)
    n_bg_colours: int = len(BACKGROUND_COLOURS)
    shape_ids: list[int] = field(init=False)

    def __post_init__(self):
        self.shapes = tuple(self.shapes)
        self.size_range = tuple(float(v) for v in self.size_range)
        unknown = [s for s in self.shapes if s not in ALL_SHAPES]
        if unknown:
            raise CfxError(f"dataset.shapes has unknown shape(s) {unknown}; choose from {list(ALL_SHAPES)}")
        if self.rho is not None and not 0.0 <= self.rho <= 1.0:
            raise CfxError(f"dataset.rho={self.rho} must lie in [0, 1] (or be null for an unbiased split)")
        self.shape_ids = [ALL_SHAPES.index(s) for s in self.shapes]
        self._coords = None

    # ---------------------------------------------------------------- factors
    @property
    def margin(self) -> float:
        """Distance from the border that keeps the largest object fully inside."""
        reach = _TRIANGLE_SIDE / 2 if "triangle" in self.shapes else 1.0
        return self.size_range[1] * reach + 1.0 / self.image_size

    def preferred_backgrounds(self, label: int) -> list[int]:
        """Backgrounds that a biased split pairs with the shape of this label."""
        return [b for b in range(self.n_bg_colours) if b % len(self.shapes) == label]

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Draw n factor sets. ``shape`` holds the label (index into ``self.shapes``)."""
        label = rng.integers(0, len(self.shapes), n)
        size = rng.random(n)
        obj = rng.integers(0, self.n_obj_colours, n)
        bg = rng.integers(0, self.n_bg_colours, n)
        if self.rho is not None:
            biased = rng.random(n) < self.rho
            for i in range(n):
                pref = self.preferred_backgrounds(int(label[i]))
                pool = pref if biased[i] else [b for b in range(self.n_bg_colours) if b not in pref]
                bg[i] = pool[rng.integers(0, len(pool))]
        m = self.margin
        pos = m + (1 - 2 * m) * rng.random((n, 2))
        return {"shape": label, "size": size, "obj_colour": obj, "bg_colour": bg,
                "pos_x": pos[:, 0], "pos_y": pos[:, 1]}

    def factors_for_indices(self, split: str, indices, seed: int) -> dict[str, np.ndarray]:
        """Deterministic factors of dataset items: item i depends only on (seed, split, i)."""
        rows = [self.sample(np.random.default_rng([seed, SPLITS[split], int(i)]), 1) for i in indices]
        return {k: np.concatenate([r[k] for r in rows]) for k in FACTOR_NAMES}

    def size_of(self, size_norm):
        """Half-extent (fraction of image side) of a normalised size in [0, 1]."""
        lo, hi = self.size_range
        return lo + (hi - lo) * np.asarray(size_norm, dtype=np.float64)

    # -------------------------------------------------------------- rendering
    def render(self, factors: dict[str, np.ndarray]) -> torch.Tensor:
        """Images N×3×H×W in [-1, 1] from factor arrays (``shape`` = label)."""
        alpha = self.object_mask(factors)
        n = alpha.shape[0]
        f = {k: torch.as_tensor(np.asarray(factors[k])).long() for k in ("obj_colour", "bg_colour")}
        obj = torch.tensor(OBJECT_COLOURS, dtype=torch.float32)[f["obj_colour"]].view(n, 3, 1, 1)
        bg = torch.tensor(BACKGROUND_COLOURS, dtype=torch.float32)[f["bg_colour"]].view(n, 3, 1, 1)
        img = bg * (1 - alpha) + obj * alpha
        return img * 2 - 1

    def object_mask(self, factors: dict[str, np.ndarray]) -> torch.Tensor:
        """N×1×H×W coverage of the object in [0, 1] (a one-pixel anti-aliased edge)."""
        h = self.image_size
        if self._coords is None:
            c = torch.arange(h, dtype=torch.float32) + 0.5
            self._coords = torch.meshgrid(c, c, indexing="ij")  # (y, x) in pixels
        yy, xx = self._coords
        f = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in factors.items()}
        n = f["shape"].shape[0]
        s = torch.as_tensor(self.size_of(factors["size"]), dtype=torch.float32).view(n, 1, 1) * h
        dx = xx[None] - f["pos_x"].view(n, 1, 1) * h
        dy = yy[None] - f["pos_y"].view(n, 1, 1) * h
        global_shape = torch.as_tensor([self.shape_ids[int(v)] for v in np.asarray(factors["shape"])])
        sdf = torch.empty(n, h, h)
        for sid, fn in enumerate((_sdf_circle, _sdf_square, _sdf_triangle)):
            sel = global_shape == sid
            if sel.any():
                sdf[sel] = fn(dx[sel], dy[sel], s[sel])
        return (0.5 - sdf).clamp(0, 1)[:, None]

    def ideal_counterfactual(self, factors: dict[str, np.ndarray], **changes) -> torch.Tensor:
        """Render the same factors with only the named ones replaced (e.g. shape=label)."""
        changed = {k: np.array(v, copy=True) for k, v in factors.items()}
        for key, value in changes.items():
            changed[key] = np.broadcast_to(np.asarray(value), changed[key].shape).astype(changed[key].dtype)
        return self.render(changed)


def _sdf_circle(dx, dy, s):
    return torch.sqrt(dx**2 + dy**2) - s


def _sdf_square(dx, dy, s):
    a = s * _SQUARE_HALF
    qx, qy = dx.abs() - a, dy.abs() - a
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sdf_triangle(dx, dy, s):
    # Equilateral triangle pointing up, centred on its bounding box (exact SDF of Inigo Quilez,
    # whose triangle is centred on its centroid, a sixth of the height below the box centre).
    side = s * _TRIANGLE_SIDE
    r = side / 2
    k = math.sqrt(3.0)
    px = dx.abs() - r
    py = -dy + side * k / 12 + r / k  # image y grows downwards
    flip = px + k * py > 0
    px2 = torch.where(flip, (px - k * py) / 2, px)
    py2 = torch.where(flip, (-k * px - py) / 2, py)
    px2 = px2 - torch.clamp(px2, -2 * r, torch.zeros_like(px2))
    return -torch.sqrt(px2**2 + py2**2) * torch.sign(py2)


class SyntheticDataset:
    """Items of one split of a synthetic world: item i depends only on (seed, split, i)."""

    has_factors = True

    def __init__(self, split: str = "test", num_images: int = 32, seed: int = 0, image_size: int = 32,
                 shapes=("circle", "square"), size_range=(0.16, 0.30), rho: float | None = None, **_):
        if split not in SPLITS:
            raise CfxError(f"dataset.split={split!r} is unknown; use one of {list(SPLITS)}")
        self.world = SyntheticWorld(image_size=image_size, shapes=tuple(shapes), size_range=tuple(size_range), rho=rho)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise CfxError(f"dataset.num_images={num_images} must be a positive integer")
        self.split, self.num_images, self.seed = split, int(num_images), int(seed)
        self.classes = list(self.world.shapes)

    def __len__(self):
        return self.num_images

    def ids(self, indices) -> list[str]:
        return [f"{self.split}_{int(i)}" for i in indices]

    def batch(self, indices) -> dict:
        f = self.world.factors_for_indices(self.split, indices, self.seed)
        return {"index": list(indices), "id": [f"{self.split}_{i}" for i in indices], "x": self.world.render(f),
                "label": torch.as_tensor(f["shape"]).long(), "value": torch.as_tensor(f["size"]).float(),
                "factors": f}
