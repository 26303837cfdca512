"""DVCE's augmentations of the clean estimate before a classifier's gradient is taken.

The public DVCE code tiles x̂_0 ``copies`` times, leaves the first copy as it is and passes the
others through kornia's RandomAffine(15°, translate 0.1, p = 0.7, border padding) and
RandomPerspective(0.7, p = 0.7). Here the same transforms are drawn from each sample's own
generator (so a sample gets the same augmentations whatever its batch) and applied with kornia's
differentiable warps, affine and perspective composed into one homography.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _affine(h: int, w: int, g: torch.Generator, degrees: float, translate: float) -> Tensor:
    """3×3: rotation by a uniform angle in ±degrees about the centre, then a shift of up to ±translate·size."""
    angle = math.radians((torch.rand((), generator=g).item() * 2 - 1) * degrees)
    tx, ty = ((torch.rand(2, generator=g) * 2 - 1) * translate * torch.tensor([w, h])).tolist()
    cx, cy = (w - 1) / 2, (h - 1) / 2
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, cx - c * cx + s * cy + tx], [s, c, cy - s * cx - c * cy + ty], [0.0, 0.0, 1.0]])


def _perspective(h: int, w: int, g: torch.Generator, distortion: float) -> Tensor:
    """3×3 homography moving each corner inwards by up to distortion·half-size (kornia's RandomPerspective)."""
    from kornia.geometry.transform import get_perspective_transform

    corners = torch.tensor([[0.0, 0.0], [w - 1, 0.0], [w - 1, h - 1], [0.0, h - 1]])
    inward = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    offsets = torch.rand(4, 2, generator=g) * distortion * torch.tensor([w / 2, h / 2])
    return get_perspective_transform(corners[None], (corners + inward * offsets)[None])[0]


def dvce_augment(x: Tensor, copies: int, generators, degrees: float = 15.0, translate: float = 0.1,
                 distortion: float = 0.7, p: float = 0.7) -> Tensor:
    """(N·copies)×C×H×W, sample-major: for each image itself, then copies − 1 augmented versions."""
    if copies == 1:
        return x
    from kornia.geometry.transform import warp_perspective

    n, _, h, w = x.shape
    mats = []
    for i in range(n):
        g = generators[i]
        for _ in range(copies - 1):
            m = torch.eye(3)
            if torch.rand((), generator=g).item() < p:
                m = _affine(h, w, g, degrees, translate) @ m
            if torch.rand((), generator=g).item() < p:
                m = _perspective(h, w, g, distortion) @ m
            mats.append(m)
    src = x.repeat_interleave(copies - 1, dim=0)
    warped = warp_perspective(src, torch.stack(mats).to(x), (h, w), padding_mode="border", align_corners=True)
    out = torch.cat([x[:, None], warped.view(n, copies - 1, *x.shape[1:])], dim=1)
    return out.reshape(n * copies, *x.shape[1:])
