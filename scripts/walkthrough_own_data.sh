#!/usr/bin/env bash
# The README's "Your own images and models" walk-through, end to end, on a digits-like image set made here
# (no download): make the data -> train a classifier -> train a pixel DDPM -> check the DDPM's samples with the
# classifier -> explain 16 test images with FastDiME and DiME (paper defaults, then a calibrated / tuned
# strength) -> one table; each job folder has its grid.png.
#   bash scripts/walkthrough_own_data.sh [WORK=outputs/own_data]
# Measured on 2 shared CPU cores, one thread per process (README): data 3 s, classifier 1.1 min, DDPM 71 min,
# sample check 2.5 min, the five jobs and the calibration 14 min (11.4 of them DiME with the paper's
# defaults). THREADS=2 gives the training runs both cores.
set -euo pipefail
W=${1:-outputs/own_data}
T=${THREADS:-1}
export OMP_NUM_THREADS=$T

# 0. the data: W/digits/{train,test}/{3,8}/*.png, 32x32 (your own: one sub-folder per class, and a test folder)
python scripts/make_digits.py "$W/digits" --per-class 1000 --test-per-class 100

# 1. a classifier (small CNN; 20% of the training folder held out, its accuracy printed and in config.json)
cfx train classifier dataset=folder dataset.root="$W/digits/train" out="$W/models/clf" work_dir="$W/train/clf" \
    threads="$T"

# 2. a pixel DDPM of the same images (checkpoints in work_dir: a killed run resumes there; one work_dir per model)
cfx train ddpm dataset=folder dataset.root="$W/digits/train" out="$W/models/ddpm" work_dir="$W/train/ddpm" \
    trainable.steps=3000 trainable.decay_from=2250 threads="$T"

# 3. does the classifier recognise the DDPM's samples? (256 samples, 50 steps; confidence > 0.9, per class)
python - "$W/models/ddpm" "$W/models/clf" <<'EOF'
import json, sys
import torch
from cfx_cli.diffusion.sampler import DDPMSampler
from cfx_cli.models.explained import zoo_model
from cfx_cli.models.generative import load_diffusers_ddpm

ddpm, clf = load_diffusers_ddpm(sys.argv[1]), zoo_model(sys.argv[2], "classification")
classes = json.load(open(f"{sys.argv[2]}/config.json"))["classes"]
with torch.no_grad():
    z = DDPMSampler(ddpm, 50).sample(256, ddpm.latent_shape, torch.Generator().manual_seed(0)).clamp(-1, 1)
    conf, pred = clf(z).softmax(1).max(1)
ok = conf > 0.9
print(f"samples recognised with p > 0.9: {ok.float().mean():.3f}; per class: "
      + ", ".join(f"{c} {int(((pred == i) & ok).sum())}" for i, c in enumerate(classes)) + f" of {len(z)}")
EOF

# 4. explain 16 test images, balanced over the classes (metrics=basic: a folder has no factor oracle)
E=(dataset=folder dataset.root="$W/digits/test" dataset.num_images=16 dataset.subset=balanced metrics=basic
   classifier.path="$W/models/clf" diffusion=diffusers_ddpm diffusion.path="$W/models/ddpm")
cfx run "${E[@]}" method=fastdime hydra.run.dir="$W/jobs/fastdime_paper"     # the paper's scales 8/10/15
cal=$(cfx calibrate "${E[@]}" method=fastdime --values 10 30 100 300 --rate 0.8)  # a strength for this model
echo "$cal"; S=$(sed -n 's/^use: //p' <<< "$cal")
cfx run "${E[@]}" method=fastdime "$S" hydra.run.dir="$W/jobs/fastdime"      # measured: method.scales=[30.0]
cfx run "${E[@]}" method=dime hydra.run.dir="$W/jobs/dime_paper"             # the paper's setting: 11 min
# `cfx train ddpm` makes the synthetic DDPM's architecture and schedule: its tuned values are a starting point
cfx run "${E[@]}" method=dime tuning=dime_synthetic_ddpm hydra.run.dir="$W/jobs/dime"
cfx run "${E[@]}" method=fastdime tuning=fastdime_synthetic_ddpm hydra.run.dir="$W/jobs/fastdime_synthetic_tuning"
cfx aggregate "$W/jobs" --by method method.scales method.tau
echo "pictures: $W/jobs/*/grid.png (original | counterfactual | difference)"
