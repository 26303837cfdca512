#!/usr/bin/env bash
# The papers' table on the synthetic benchmark: every method on the clean shape classifier (ACE also on the
# robust one), FastDiME, AC-RE and Diff-AE-RE on the size regressor; 16 test images, seeds 0 and 1 (σ_L is
# across them), each job measuring FID/sFID/KID, LPIPS (in the factor oracle's features) and COUT at its end;
# then `cfx aggregate --table paper`, `cfx report` and, where Chromium is installed, $out/report.png (docs/report.png:
# the page's top, its counterfactual part cut to DiME's and FastDiME's rows, whose grids show real and adversarial).
#   bash scripts/report_paper_table.sh [outputs/paper_table [OVERRIDE...]]
set -euo pipefail
out=${1:-outputs/paper_table}
shift || true
common=(dataset.num_images=16 batch_size=16 seed=0,1)
cfx run -m method=dime,fastdime,ace,dvce,ldce,diffae "${common[@]}" hydra.sweep.dir="$out/classifier" "$@"
cfx run -m method=ace classifier=synthetic_shape_robust "${common[@]}" hydra.sweep.dir="$out/ace_robust" "$@"
cfx run -m method=fastdime,ace,diffae_re regressor=synthetic_size "${common[@]}" hydra.sweep.dir="$out/regressor" "$@"
cfx aggregate "$out" --table paper --by method model
cfx report "$out" --by method model
if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null; then
    python3 "$(dirname "$0")/screenshot_report.py" "$out/report.html" "$out/report.png" --width 1280 --height 3700 --trim \
        --only-rows "method=dime, model=synthetic_shape" "method=fastdime, model=synthetic_shape"
fi
