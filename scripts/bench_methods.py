"""Each method's wall time over its floor, and DiME on the tiny ADM fixture.

    python scripts/bench_methods.py synthetic [num_images] [device]   # every method on the synthetic benchmark
    python scripts/bench_methods.py adm [batch] [device] [dtype] [compile]   # DiME, tiny ADM, tau 60 of 200, one scale
    python scripts/bench_methods.py adm128 [batch] [device] [dtype] [methods]   # CelebA-128 ADM, s/CF (GPU)

The *floor* of a run is the time of its UNet and explained-model calls alone: every call the
method made is recorded (role, batch size, with or without a backward pass), then each kind of
call is timed in isolation in the same process and the floor is Σ count × unit time. wall/floor
is the overhead of the method's own code (noise draws, masks, bookkeeping); ≤ 1.15 is the target.
"""
from __future__ import annotations

import os

# OpenMP threads that spin between calls instead of sleeping: on 2 CPU cores DiME on the tiny ADM
# takes 101 s instead of 158 s eager, 65 s instead of 74 s compiled (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from cfx_cli import ZOO_DIR
from cfx_cli.data.synthetic import SyntheticDataset
from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.methods.base import SampleRNG
from cfx_cli.methods.dime import DiME
from cfx_cli.methods.fastdime import FastDiME
from cfx_cli.models.counting import CostMeter, Counted
from cfx_cli.models.explained import zoo_model
from cfx_cli.models.generative import load_diffusers_ddpm
from cfx_cli.objectives import ClassificationObjective


class Recorder(Counted):
    """Logs every call: (role, batch, backward?) — the backward is known once the output's grad flows."""

    def __init__(self, module, role, log):
        super().__init__(module, CostMeter(), role)
        self.log = log

    def forward(self, x, *args, **kwargs):
        out = self.module(x, *args, **kwargs)
        t = out.sample if hasattr(out, "sample") else out
        entry = [self.role, x.shape[0], False]
        self.log.append(entry)
        if t.requires_grad:
            t.register_hook(lambda g: entry.__setitem__(2, True))
        return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def unit_times(calls: Counter, unet, model, shape, device, reps=15) -> dict:
    """Median seconds of each distinct (role, batch, backward) call, timed alone."""
    times = {}
    for role, batch, backward in calls:
        x = torch.randn(batch, *shape, device=device)
        t = torch.full((batch,), 10, device=device, dtype=torch.long)
        samples = []
        for i in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            if role == "unet":
                with torch.no_grad():
                    unet(x, t)
            elif backward:
                xx = x.clone().requires_grad_(True)
                torch.autograd.grad(model(xx).sum(), xx)
            else:
                with torch.no_grad():
                    model(x)
            sync(device)
            if i:  # the first call warms up
                samples.append(time.perf_counter() - t0)
        times[(role, batch, backward)] = statistics.median(samples)
    return times


def run(name, method, x, target, indices, unet, model, device, log):
    log.clear()
    sync(device)
    t0 = time.perf_counter()
    method.explain(x, target, SampleRNG(0, indices, device, meter=METER))
    sync(device)
    wall = time.perf_counter() - t0
    calls = Counter(tuple(e) for e in log)
    units = unit_times(calls, unet, model, x.shape[1:], device)
    floor = sum(n * units[k] for k, n in calls.items())
    n_unet = sum(n for k, n in calls.items() if k[0] == "unet")
    return {"method": name, "wall_s": wall, "floor_s": floor, "ratio": wall / floor, "unet_calls": n_unet,
            "model_calls": sum(n for k, n in calls.items() if k[0] == "model")}


METER = CostMeter()


def synthetic(n=16, device="cpu"):
    device = torch.device(device)
    log = []
    unet = Recorder(load_diffusers_ddpm(ZOO_DIR / "synthetic_ddpm").to(device), "unet", log)
    clf = Recorder(zoo_model(ZOO_DIR / "synthetic_shape", "classification").to(device), "model", log)
    obj = ClassificationObjective()
    batch = SyntheticDataset(num_images=n).batch(list(range(n)))
    x = batch["x"].to(device)
    with torch.no_grad():
        target = obj.target(clf(x))
    # the synthetic tuning (conf/tuning/*_synthetic_ddpm.yaml), one scale so that every image runs once
    methods = {"dime": DiME(DDPMSampler(unet, 100), clf, obj, tau=30, scales=(20.0,), lambda_perc=0,
                            classifier_loss="ce")}
    for v in ("mask", "nomask", "2", "2+"):
        methods[f"fastdime[{v}]"] = FastDiME(DDPMSampler(unet, 200), clf, obj, variant=v, tau=60, scales=(100.0,),
                                             lambda_perc=0, classifier_loss="ce")
    rows = [run(k, m, x, target, batch["index"], unet, clf, device, log) for k, m in methods.items()]
    print(f"{n} images, {device}, torch threads {torch.get_num_threads()}")
    print(f"{'method':16s} {'wall s':>8s} {'floor s':>8s} {'wall/floor':>10s} {'unet':>6s} {'model':>6s}")
    for r in rows:
        print(f"{r['method']:16s} {r['wall_s']:8.2f} {r['floor_s']:8.2f} {r['ratio']:10.3f} {r['unet_calls']:6d} "
              f"{r['model_calls']:6d}")


def adm(batch=8, device="cpu", dtype=None, compile=False):
    """DiME as the issue's benchmark: the tiny ADM fixture (32×32), batch 8, τ = 60 of 200, one scale."""
    import json

    from cfx_cli.models.generative import load_adm
    from cfx_cli.models.explained import ExplainedModel
    from torchvision.models import densenet121

    device = torch.device(device)
    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "adm"
    flags = json.loads((fixtures / "tiny_adm_flags.json").read_text())
    flags = {k: v for k, v in flags.items() if k not in ("timestep_respacing", "use_fp16")}
    log = []
    gen = load_adm(fixtures / "tiny_adm_celeba_format.pt", compute_dtype=dtype, compile=compile, **flags).to(device)
    unet = Recorder(gen, "unet", log)
    if compile:  # the one-time compile, timed apart from the method
        t0 = time.perf_counter()
        with torch.no_grad():
            gen(torch.zeros(batch, 3, 32, 32, device=device), torch.zeros(batch, dtype=torch.long, device=device))
        print(f"torch.compile (one-time, first call): {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(0)
    clf = Recorder(ExplainedModel(densenet121(num_classes=40), "classification", num_classes=40,
                                  head="sigmoid").to(device), "model", log)
    obj = ClassificationObjective(head="sigmoid", query=31, num_outputs=40)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    with torch.no_grad():
        target = obj.target(clf(x))
    method = DiME(DDPMSampler(unet, 200), clf, obj, tau=60, scales=(8.0,), lambda_perc=0)
    r = run("dime[tiny adm]", method, x, target, list(range(batch)), unet, clf, device, log)
    print(f"DiME, tiny ADM fixture, batch {batch}, tau 60 of 200, one scale, {device}, dtype {dtype or 'fp32'}, "
          f"compile {compile}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"wall {r['wall_s']:.1f} s  floor {r['floor_s']:.1f} s  wall/floor {r['ratio']:.3f}  "
          f"UNet calls {r['unet_calls']}  classifier calls {r['model_calls']}  s/CF {r['wall_s'] / batch:.2f}")


def adm128(batch=16, device="cuda", dtype=None, methods="fastdime,dime"):
    """The CelebA 128² setting with random weights in the released architecture (ADM flags of
    ddpm-celeba-128, DenseNet-121 classifier at 128): seconds per counterfactual, fp32 vs bf16/fp16."""
    from cfx_cli.diffusion.schedule import NoiseSchedule
    from cfx_cli.models.adm import ADMUNet
    from cfx_cli.models.explained import ExplainedModel
    from cfx_cli.models.generative import PixelDiffusion
    from torchvision.models import densenet121

    device = torch.device(device)
    torch.manual_seed(0)
    net = ADMUNet(image_size=128, num_channels=128, num_res_blocks=2, attention_resolutions="32,16,8", num_heads=4,
                  learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True).eval().requires_grad_(False)
    net.set_compute_dtype(dtype)
    gen = PixelDiffusion(net, NoiseSchedule.from_config("linear", 500), variance="learned_range", image_size=128)
    log = []
    unet = Recorder(gen.to(device), "unet", log)
    clf = Recorder(ExplainedModel(densenet121(num_classes=40), "classification", num_classes=40,
                                  head="sigmoid").to(device), "model", log)
    obj = ClassificationObjective(head="sigmoid", query=31, num_outputs=40)
    x = (torch.rand(batch, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    with torch.no_grad():
        target = obj.target(clf(x))
    for name in methods.split(","):
        m = (DiME if name == "dime" else FastDiME)(DDPMSampler(unet, 200), clf, obj, tau=60, scales=(8.0,),
                                                    lambda_perc=0)
        r = run(name, m, x, target, list(range(batch)), unet, clf, device, log)
        print(f"{name}: ADM CelebA-128 (random weights), batch {batch}, {device}, trunk {dtype or 'fp32'}: "
              f"{r['wall_s'] / batch:.3f} s/CF, wall/floor {r['ratio']:.3f}, UNet calls {r['unet_calls']}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "synthetic"
    args = sys.argv[2:]
    if what == "synthetic":
        synthetic(int(args[0]) if args else 16, args[1] if len(args) > 1 else "cpu")
    elif what == "adm":
        adm(int(args[0]) if args else 8, args[1] if len(args) > 1 else "cpu",
            None if len(args) < 3 or args[2] == "fp32" else args[2], len(args) > 3 and args[3] == "compile")
    elif what == "adm128":
        adm128(int(args[0]) if args else 16, args[1] if len(args) > 1 else "cuda", args[2] if len(args) > 2 else None,
               args[3] if len(args) > 3 else "fastdime,dime")
    else:
        sys.exit("usage: bench_methods.py synthetic|adm [...]")
