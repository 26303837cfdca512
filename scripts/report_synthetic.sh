#!/usr/bin/env bash
# The synthetic benchmark report: DiME and every FastDiME variant on the clean and the biased
# classifier, FastDiME on the size regressor, two seeds each, then one table.
#   bash scripts/report_synthetic.sh [outputs/report]
set -euo pipefail
out=${1:-outputs/report}
cfx run -m experiment=synthetic_table hydra.sweeper.params.method=dime hydra.sweep.dir="$out/dime"
cfx run -m experiment=synthetic_fastdime_variants hydra.sweep.dir="$out/fastdime"
cfx run -m experiment=synthetic_size_regression hydra.sweep.dir="$out/regression"
cfx aggregate "$out" --by method method.variant model
