"""Renderer throughput: synthetic images per second at 32×32 and 64×64 (batch 1024)."""
import time

import numpy as np

from cfx_cli.data.synthetic import SyntheticWorld

for size in (32, 64):
    world = SyntheticWorld(image_size=size, shapes=("circle", "square", "triangle"))
    rng = np.random.default_rng(0)
    world.render(world.sample(rng, 16))  # warm-up
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 2.0:
        world.render(world.sample(rng, 1024))
        n += 1024
    print(f"{size}x{size}: {n / (time.perf_counter() - t0):,.0f} images/s")
