#!/usr/bin/env bash
# The synthetic benchmark report: DiME and every FastDiME variant on the clean and the biased
# classifier, FastDiME on the size regressor, two seeds each, then one table.
#   bash scripts/report_synthetic.sh [outputs/report [OVERRIDE...]]   e.g. ... outputs/report_gpu device=cuda
set -euo pipefail
out=${1:-outputs/report}
shift || true
cfx run -m experiment=synthetic_table hydra.sweeper.params.method=dime hydra.sweep.dir="$out/dime" "$@"
cfx run -m experiment=synthetic_fastdime_variants hydra.sweep.dir="$out/fastdime" "$@"
cfx run -m experiment=synthetic_size_regression hydra.sweep.dir="$out/regression" "$@"
cfx aggregate "$out" --by method method.variant model
