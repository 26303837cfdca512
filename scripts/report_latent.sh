#!/usr/bin/env bash
# The latent methods on the synthetic benchmark: LDCE (consensus on / off) and Diff-AE on the clean and the
# biased classifier, Diff-AE-RE on the size regressor; 16 test images, seed 0 (the pixel methods' README
# numbers use the same images and seed), then one table.
#   bash scripts/report_latent.sh [outputs/report_latent [OVERRIDE...]]
set -euo pipefail
out=${1:-outputs/report_latent}
shift || true
common=(dataset.num_images=16 batch_size=16 seed=0)
cfx run -m method=ldce method.consensus=true,false classifier=synthetic_shape,synthetic_shape_biased \
    "${common[@]}" hydra.sweep.dir="$out/ldce" "$@"
cfx run -m method=diffae classifier=synthetic_shape,synthetic_shape_biased "${common[@]}" hydra.sweep.dir="$out/diffae" "$@"
cfx run -m method=diffae_re "${common[@]}" hydra.sweep.dir="$out/diffae_re" "$@"
cfx aggregate "$out" --by method method.consensus model
