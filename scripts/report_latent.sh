#!/usr/bin/env bash
# The latent methods on the synthetic benchmark: LDCE (consensus on / off) and Diff-AE on the clean and the
# biased classifier, Diff-AE-RE on the size regressor; 16 test images, seed 0 (the pixel methods' README
# numbers use the same images and seed), then one table and $out/latent_grid.png (docs/latent_grid.png: the first
# 3 rows of LDCE's grids on the clean and the biased classifier and of Diff-AE's on the biased one).
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
# one job folder of a sweep, by the overrides in its name (Hydra sorts them by key)
job() { local d; d=$(compgen -G "$1" | head -n 1) || true; [ -n "$d" ] || { echo "report_latent: no job folder matches $1" >&2; exit 1; }; echo "$d"; }
python3 "$(dirname "$0")/compose_grids.py" "$out/latent_grid.png" --rows 3 \
    "$(job "$out/ldce/*classifier=synthetic_shape,*consensus=[Tt]rue*")" "LDCE (consensus), clean classifier" \
    "$(job "$out/ldce/*classifier=synthetic_shape_biased,*consensus=[Tt]rue*")" "LDCE (consensus), biased classifier" \
    "$(job "$out/diffae/*classifier=synthetic_shape_biased,*")" "Diff-AE, biased classifier"
