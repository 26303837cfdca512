"""Seconds per counterfactual and UNet calls of DiME vs FastDiME variants, measured in one run.

    python scripts/bench_methods.py [num_images]

Uses the synthetic defaults of conf/tuning (DiME: respacing 100, tau 30; FastDiME:
respacing 200, tau 60) and a single scale so every method does the same number of passes.
"""
import sys
import time

import torch

from cfx_cli import ZOO_DIR
from cfx_cli.data.synthetic import SyntheticDataset
from cfx_cli.methods.base import SampleRNG
from cfx_cli.methods.dime import DiME
from cfx_cli.methods.fastdime import FastDiME
from cfx_cli.models.diffusion import load_diffusers_ddpm
from cfx_cli.models.explained import zoo_model
from cfx_cli.objectives import ClassificationObjective

n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
diffusion = load_diffusers_ddpm(ZOO_DIR / "synthetic_ddpm")
clf = zoo_model(ZOO_DIR / "synthetic_shape", "classification")
obj = ClassificationObjective()
batch = SyntheticDataset(num_images=n).batch(list(range(n)))
x = batch["x"]
target = obj.target(clf(x))
methods = {"dime": DiME(diffusion, clf, obj, respacing=100, tau=30, scales=(10.0,), lambda_perc=0.0)}
for v in ("mask", "nomask", "2", "2+"):
    methods[f"fastdime[{v}]"] = FastDiME(diffusion, clf, obj, variant=v, scales=(10.0,))
rows = []
for name, m in methods.items():
    t0 = time.perf_counter()
    res = m.explain(x, target, SampleRNG(0, batch["index"]))
    sec = (time.perf_counter() - t0) / n
    rows.append((name, sec, res.nfe_unet.float().mean().item(), res.success.float().mean().item()))
base = rows[0][1]
print(f"{'method':16s} {'s/cf':>8s} {'x dime':>8s} {'nfe_unet':>9s} {'flip':>6s}")
for name, sec, nfe, flip in rows:
    print(f"{name:16s} {sec:8.3f} {base / sec:8.1f} {nfe:9.0f} {flip:6.2f}")
