"""DVCE's augmentations of the clean estimate before a classifier's gradient is taken.

The public DVCE code (blended_diffusion/optimization/augmentations.py, kornia 0.6.4 as pinned in its
python_38_dvces.yml) average-pools x̂_0 to the classifier's input size, tiles it ``copies`` times,
leaves the first copy as it is and passes the others through

    RandomAffine(degrees=15, translate=0.1, p=0.7, padding_mode="border")   then
    RandomPerspective(distortion_scale=0.7, p=0.7)                           (zero padding)

each applied, with probability p, as its own bilinear warp. Here, per augmented copy, 13 uniforms are
drawn through the method's :class:`~cfx_cli.methods.base.SampleRNG` (each sample from its own
generator, so a sample gets the same augmentations whatever its batch; a parity test replays the
public code's draws through a NoiseBank):

    u[0] < p: apply the affine;  angle = −15° + 30° u[1];  shift = (−t + 2t u[2:4]) · (W, H), t = translate
    u[4] < p: apply the perspective;  corner k moves inwards by 0.7 · (W/2, H/2) · u[5 + 2k : 7 + 2k]

mapped to parameters with kornia's arithmetic, and warped as kornia 0.6.4 warps (the matrix acts on
pixel coordinates normalised as 2x/(W−1) − 1, the grid is sampled with align_corners=False). Later
kornia releases changed that normalisation, so the warps are written out here rather than called.

``translate`` is a fraction or an (x, y) pair. kornia 0.6.4 reads the public code's scalar
``translate=0.1`` as the pair (0, 0.1): its copies shift only vertically (parity: translate=(0, 0.1)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DRAWS = 13  # uniforms per augmented copy


def _to_normalised(m: Tensor, h: int, w: int) -> Tensor:
    """A pixel-coordinate 3×3 map expressed on [-1, 1] coordinates, x_n = 2x/(W−1) − 1 (kornia 0.6.4)."""
    n = torch.tensor([[2.0 / (w - 1), 0.0, -1.0], [0.0, 2.0 / (h - 1), -1.0], [0.0, 0.0, 1.0]],
                     dtype=m.dtype, device=m.device)[None]
    return n @ (m @ torch.inverse(n))


def warp_affine(src: Tensor, m: Tensor, padding_mode: str = "border") -> Tensor:
    """kornia 0.6.4's warp_affine(src, m[:, :2], (H, W), align_corners=False): dst(p) = src(m⁻¹ p)."""
    b, c, h, w = src.shape
    inv = torch.inverse(_to_normalised(m, h, w))
    grid = F.affine_grid(inv[:, :2, :], [b, c, h, w], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def warp_perspective(src: Tensor, m: Tensor, padding_mode: str = "zeros") -> Tensor:
    """kornia 0.6.4's warp_perspective(src, m, (H, W), align_corners=False)."""
    b, c, h, w = src.shape
    inv = torch.inverse(_to_normalised(m, h, w))
    xs = (torch.linspace(0, w - 1, w, dtype=src.dtype, device=src.device) / (w - 1) - 0.5) * 2
    ys = (torch.linspace(0, h - 1, h, dtype=src.dtype, device=src.device) / (h - 1) - 0.5) * 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(1, -1, 3).expand(b, -1, -1)
    out = torch.bmm(pts, inv.transpose(1, 2))
    z = out[..., 2:]
    scale = torch.where(z.abs() > 1e-8, 1.0 / (z + 1e-8), torch.ones_like(z))
    grid = (scale * out[..., :2]).reshape(b, h, w, 2)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _pair(translate) -> tuple[float, float]:
    if isinstance(translate, (int, float)):
        return float(translate), float(translate)
    tx, ty = translate
    return float(tx), float(ty)


def augmentation_matrices(u: Tensor, h: int, w: int, degrees: float = 15.0, translate=0.1,
                          distortion: float = 0.7):
    """The affine and perspective 3×3 matrices (pixel coordinates) of rows of 13 uniforms, as kornia's
    AffineGenerator / PerspectiveGenerator turn its Uniform draws (low + u·(high − low)) into them."""
    from kornia.geometry.transform import get_affine_matrix2d, get_perspective_transform

    f32 = dict(dtype=torch.float32)
    n = u.shape[0]
    u = u.float().cpu()
    lo, hi = torch.tensor(-float(degrees), **f32), torch.tensor(float(degrees), **f32)
    angle = lo + u[:, 1] * (hi - lo)
    (tx, ty), shift = _pair(translate), []
    for t, col, size in ((tx, 2, w), (ty, 3, h)):
        tlo, thi = torch.tensor(-t, **f32), torch.tensor(t, **f32)
        shift.append((tlo + u[:, col] * (thi - tlo)) * size)
    shift = torch.stack(shift, -1)
    centre = (torch.tensor([w, h], **f32).view(1, 2) / 2.0 - 0.5).expand(n, -1)
    affine = get_affine_matrix2d(shift, centre, torch.ones(n, 2), angle, torch.zeros(n), torch.zeros(n))
    start = torch.tensor([[[0.0, 0.0], [w - 1, 0.0], [w - 1, h - 1], [0.0, h - 1]]]).expand(n, -1, -1)
    d = torch.tensor(float(distortion), **f32)
    factor = torch.stack([d * w / 2, d * h / 2]).view(-1, 1, 2)
    inward = torch.tensor([[[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]])
    end = start + factor * u[:, 5:].reshape(n, 4, 2) * inward
    return affine, get_perspective_transform(start, end)


def dvce_augment(x: Tensor, copies: int, rng, degrees: float = 15.0, translate=0.1,
                 distortion: float = 0.7, p: float = 0.7, size: int | None = None) -> Tensor:
    """(N·copies)×C×H'×W', sample-major: for each image itself, then copies − 1 augmented versions.

    ``rng``: the method's SampleRNG (one ``rand((copies − 1, 13))`` draw per call). ``size``: average-pool
    to size×size first (the public code pools to its classifier's input size, 224, when copies > 1)."""
    if copies == 1:
        return x
    if size:
        x = F.adaptive_avg_pool2d(x, int(size))
    n, c, h, w = x.shape
    u = rng.rand((copies - 1, DRAWS)).reshape(n * (copies - 1), DRAWS)
    affine, persp = augmentation_matrices(u, h, w, degrees, translate, distortion)
    out = x.repeat_interleave(copies - 1, dim=0)
    for on, m, warp in ((u[:, 0] < p, affine, warp_affine), (u[:, 4] < p, persp, warp_perspective)):
        rows = on.nonzero().flatten()
        if len(rows):
            out = out.index_put((rows.to(x.device),), warp(out[rows.to(x.device)], m[rows].to(x)))
    out = torch.cat([x[:, None], out.view(n, copies - 1, c, h, w)], dim=1)
    return out.reshape(n * copies, c, h, w)
