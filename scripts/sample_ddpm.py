"""Unconditional samples of a DDPM folder as a grid PNG (for a look at the shipped model).

    python scripts/sample_ddpm.py [folder] [out.png] [steps] [n]
"""
import sys

import numpy as np
import torch
from PIL import Image

from cfx_cli import ZOO_DIR
from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.models.generative import load_diffusers_ddpm
from cfx_cli.outputs import to_uint8

folder = sys.argv[1] if len(sys.argv) > 1 else ZOO_DIR / "synthetic_ddpm"
out = sys.argv[2] if len(sys.argv) > 2 else "ddpm_samples.png"
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 50
n = int(sys.argv[4]) if len(sys.argv) > 4 else 64
ddpm = load_diffusers_ddpm(folder)
z = DDPMSampler(ddpm, steps).sample(n, ddpm.latent_shape, torch.Generator().manual_seed(0)).clamp(-1, 1)
cols = 8
rows = [np.concatenate([to_uint8(img) for img in z[r * cols:(r + 1) * cols]], 1) for r in range(n // cols)]
grid = np.concatenate(rows, 0)
Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out)
print(f"wrote {out}")
