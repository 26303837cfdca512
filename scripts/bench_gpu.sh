#!/usr/bin/env bash
# What a GPU adds to the record: the CUDA tests, s/CF at 128² (ADM CelebA architecture, random
# weights) in fp32 vs bf16, and the synthetic methods' wall/floor on the GPU.
#   bash scripts/bench_gpu.sh
set -uo pipefail
python3 -m pytest -q -rs tests/test_run.py -k cuda tests/test_adm.py 2>&1 | tail -4
for dtype in fp32 bf16; do
  python3 scripts/bench_methods.py adm128 16 cuda "$dtype" fastdime,dime
done
python3 scripts/bench_methods.py synthetic 32 cuda
