"""`cfx calibrate`: the smallest guidance strength that reaches a target flip (or success) rate on a
few images, instead of tuning by hand. Each candidate runs the job's own code (``cfx_cli.api``: the job
builder's parts, the job's batch) on the same images with the same seed; the first (smallest) value that
reaches the rate is printed as the override to use.

    cfx calibrate diffusion=diffusers_ddpm diffusion.path=... --values 10 30 100 300 --rate 0.8
"""
from __future__ import annotations

import argparse
import sys

from cfx_cli.api import Explainer, compose
from cfx_cli.errors import CfxError, one_line_errors

# The key that sets each method's guidance strength.
STRENGTH = {"dime": "method.scales", "fastdime": "method.scales", "dvce": "method.lambda_c", "ace": "method.step"}


def override(key: str, value: float) -> str:
    return f"{key}=[{value}]" if key == "method.scales" else f"{key}={value}"


def calibrate(overrides: list[str], values: list[float], rate: float, images: int, key: str | None = None,
              device: str = "auto") -> str | None:
    """Try ``values`` from the smallest; returns the first override reaching ``rate`` (or None), printing a
    line per value (rate, mean l1, UNet calls per image)."""
    method = compose(overrides).method.name
    key = key or STRENGTH.get(method)
    if key is None:
        raise CfxError(f"method={method} has no known strength key: give --key <method key>")
    for value in sorted(values):
        ex = Explainer([*overrides, override(key, value)], device=device)
        x, idx = ex.images(range(min(images, len(ex.dataset))))
        out = ex.explain(x, idx)
        ok = out.success.float().mean().item()
        l1 = ((out.x_cf - x).abs().mean().item()) / 2
        calls = out.cost["nfe_unet"].float().mean().item()
        print(f"{override(key, value):28s} rate {ok:.2f}  l1 {l1:.4f}  UNet calls/image {calls:.0f}")
        if ok >= rate:
            return override(key, value)
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
        print(f"cfx calibrate: no value reached rate {args.rate}: try larger values", file=sys.stderr)
        raise SystemExit(1)
    print(f"use: {chosen}")
