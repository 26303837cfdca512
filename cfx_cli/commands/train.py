"""`cfx train WHAT [overrides...]`: a Hydra application over conf/train.yaml (``cfx_cli.train``)."""
from __future__ import annotations

import sys

from cfx_cli import CONF_DIR
from cfx_cli.config import hydra_app
from cfx_cli.errors import one_line_errors

USAGE = """usage: cfx train WHAT [overrides...]

Reproduce a shipped model of the synthetic benchmark into outputs/zoo/WHAT (out=zoo: over the shipped
cfx_cli/zoo/WHAT itself; out=FOLDER: anywhere).

WHAT: synthetic_ddpm, synthetic_shape, synthetic_shape_biased, synthetic_shape_robust, synthetic_size,
      synthetic_oracle, synthetic_ldm, synthetic_diffae; classifier | ddpm with dataset=folder dataset.root=...
      (settings in conf/trainable/WHAT.yaml; each shipped model records its command)

overrides: device=cpu|cuda  threads=N  seed=N  out=FOLDER|zoo  work_dir=FOLDER (checkpoints: a killed run
           resumes there)  trainable.steps=N  trainable.batch_size=N ...

examples:
  cfx train synthetic_shape
  cfx train synthetic_ddpm device=cuda
  cfx train synthetic_ddpm trainable.steps=500 out=/tmp/my_ddpm     # a quick try, anywhere
  cfx train synthetic_shape out=zoo                                  # replace the shipped model
"""


def task(cfg):
    from cfx_cli.train.main import train

    with one_line_errors():
        train(cfg)


def main(args: list[str]) -> None:
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return
    if not args or "=" in args[0] or args[0].startswith("-"):
        whats = ", ".join(sorted(p.stem for p in (CONF_DIR / "trainable").glob("*.yaml")))
        print(f"cfx: error: cfx train needs WHAT: one of {whats}", file=sys.stderr)
        sys.exit(2)
    hydra_app("cfx train", "train", [f"trainable={args[0]}", *args[1:]], task)
