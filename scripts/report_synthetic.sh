#!/usr/bin/env bash
# The synthetic benchmark report: DiME, MaskDiME, ACE, DVCE (cone on/off) and every FastDiME variant on the clean
# and the biased classifier, ACE on the robust one, FastDiME and AC-RE on the size regressor, two seeds
# each, then one table.
#   bash scripts/report_synthetic.sh [outputs/report [OVERRIDE...]]   e.g. ... outputs/report_gpu device=cuda
# A sweeper param with several values is quoted ('a,b'): unquoted, Hydra reads a comma list as a sweep of the
# override itself and refuses it ("Sweeping over Hydra's configuration is not supported").
set -euo pipefail
out=${1:-outputs/report}
shift || true
cfx run -m experiment=synthetic_table "hydra.sweeper.params.method='dime,maskdime,ace,dvce'" hydra.sweep.dir="$out/table" "$@"
cfx run -m experiment=synthetic_table hydra.sweeper.params.method=dvce method=dvce method.cone_angle=null \
    hydra.sweep.dir="$out/dvce_nocone" "$@"
cfx run -m experiment=synthetic_table hydra.sweeper.params.method=ace hydra.sweeper.params.classifier=synthetic_shape_robust \
    hydra.sweep.dir="$out/ace_robust" "$@"
cfx run -m experiment=synthetic_fastdime_variants hydra.sweep.dir="$out/fastdime" "$@"
cfx run -m experiment=synthetic_size_regression hydra.sweep.dir="$out/regression" "$@"
cfx aggregate "$out" --by method method.variant method.cone_angle model
