"""`cfx calibrate`: the smallest guidance strength that reaches a target flip (or success) rate on a
few images, instead of tuning by hand; where an oracle reads the counterfactuals (the synthetic benchmark)
the rate counted is the *real* flips' (the oracle confirms), and a value whose edits jump in size (noise)
is flagged, never recommended. Each candidate runs the job's own code (``cfx_cli.api``: the job
builder's parts, the job's batch) on the same images with the same seed; the first (smallest) value that
reaches the rate is printed as the override to use.

    cfx calibrate diffusion=diffusers_ddpm diffusion.path=... --values 10 30 100 300 --rate 0.8
"""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from cfx_cli.api import Explainer, compose
from cfx_cli.errors import CfxError, one_line_errors
from cfx_cli.job.explain import BAR_FORMAT, BatchProgress

# The key that sets each method's guidance strength.
STRENGTH = {"dime": "method.scales", "fastdime": "method.scales", "maskdime": "method.scales", "dvce": "method.lambda_c", "ace": "method.step"}


def override(key: str, value: float) -> str:
    return f"{key}=[{value}]" if key == "method.scales" else f"{key}={value}"


# A value whose edits are this many times the size of the previous value's is flagged as noise.
JUMP = 3.0


def calibrate(overrides: list[str], values: list[float], rate: float, images: int, key: str | None = None,
              device: str = "auto", jump: float = JUMP) -> str | None:
    """Try ``values`` from the smallest; returns the first override reaching ``rate`` (or None), printing a
    line per value (flip rate, real-flip rate where an oracle reads the counterfactuals, mean l1, UNet calls
    per image). Where an oracle exists (the synthetic benchmark) the rate is the *real* flips' (the oracle
    confirms the target); a value whose mean l1 is more than ``jump``× the previous value's is noise (an
    adversarial edit grown large) and is never recommended."""
    from cfx_cli.config import choice

    method = choice(compose(overrides), "method")
    key = key or STRENGTH.get(method)
    if key is None:
        raise CfxError(f"method={method} has no known strength key: give --key <method key>")
    previous = None  # (value, l1) of the last value tried
    for value in sorted(values):
        ex = Explainer([*overrides, override(key, value)], device=device)
        batch = ex.dataset.batch(list(range(min(images, len(ex.dataset)))))
        x, idx = batch["x"].to(ex.device), list(batch["index"])
        bar = tqdm(total=len(x), desc=override(key, value), unit="cf", bar_format=BAR_FORMAT, leave=False, delay=1.0)
        steps = BatchProgress(bar, ex.parts["meter"], ex.parts["method"])
        steps.start(len(x))
        out = ex.explain(x, idx)
        steps.finish()
        bar.close()
        success = out.success.cpu().numpy().astype(bool) & ~out.failed.cpu().numpy().astype(bool)
        flips = float(success.mean())
        l1 = ((out.x_cf - x).abs().mean().item()) / 2
        calls = out.cost["nfe_unet"].float().mean().item()
        real = None
        oracle = ex.parts.get("oracle")
        if oracle is not None and "factors" in batch:
            task = ex.parts["model"].task
            confirmed = oracle(x, out.x_cf, batch["factors"], out.target, task,
                               getattr(ex.parts["objective"], "tolerance", 0.05))["oracle_flip"] > 0.5
            real = float((success & confirmed).mean())
        noise = previous is not None and previous[1] > 0 and l1 > jump * previous[1]
        line = f"{override(key, value):28s} rate {flips:.2f}  " + (f"real {real:.2f}  " if real is not None else "") \
            + f"l1 {l1:.4f}  UNet calls/image {calls:.0f}"
        if noise:
            line += f"  ⚠ noise: l1 {l1 / previous[1]:.1f}× that of {previous[0]:g}"
        print(line, flush=True)
        reached = (real if real is not None else flips) >= rate
        if reached and noise:
            print(f"cfx calibrate: {override(key, value)} reaches rate {rate}"
                  f"{' of real flips' if real is not None else ''} but its edits jump in size (l1 {l1:.4f}, "
                  f"{l1 / previous[1]:.1f}× that of {previous[0]:g}): noise, not recommended; try values between "
                  f"{previous[0]:g} and {value:g}", file=sys.stderr)
            return None
        if reached:
            return override(key, value)
        if real is not None and flips >= rate:
            print(f"cfx calibrate: {override(key, value)} flips the classifier ({flips:.2f}) but the oracle confirms "
                  f"only {real:.2f}: the other flips are adversarial", file=sys.stderr)
        previous = (value, l1)
    return None


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="cfx calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="the job's overrides, as for cfx run")
    ap.add_argument("--values", nargs="+", type=float, required=True, help="candidate strengths")
    ap.add_argument("--rate", type=float, default=0.8, help="flip / success rate to reach (default 0.8)")
    ap.add_argument("--images", type=int, default=8, help="how many of the dataset's images (default 8)")
    ap.add_argument("--key", default=None, help="the method key to set (default: the method's strength key)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if not 0 < args.rate <= 1:
        ap.error(f"--rate {args.rate}: a flip rate is a fraction in (0, 1]; give e.g. --rate 0.8")
    if args.images < 1:
        ap.error(f"--images {args.images}: give at least 1 image")
    with one_line_errors():
        chosen = calibrate(args.overrides, args.values, args.rate, args.images, args.key, args.device)
    if chosen is None:
        print(f"cfx calibrate: no value reached rate {args.rate} without noise (real flips where an oracle reads "
              f"the counterfactuals): see the lines above", file=sys.stderr)
        raise SystemExit(1)
    print(f"use: {chosen}")
