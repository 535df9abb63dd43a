#!/usr/bin/env bash
# The GPU checks, in one script for a lent H100/H200 (no network, no pip install of this repo):
#   1. step time odis vs ibot (bf16, ViT-S/16, batch 64, 2x224 + 10x96), one profiled step of each (operator
#      tables: where odis's extra time goes), and the SDPA backends with the OBJ mask against the unmasked floor;
#   2. end-to-end training img/s and data-wait share with 14 loader workers (ODIS and iBOT, ViT-S/16 COCO recipe).
# Usage (repo root):  OUT=/some/dir bash benchmarks/gpu_check.sh   [wheels in .whl/, shards in .devdata/coco/shards]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:?set OUT}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, timm, sys; print(sys.version.split()[0], torch.__version__, timm.__version__)" | tee -a $OUT/gpu.txt
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
for impl in mask split; do
  timeout 150 python3 benchmarks/step.py --preset gpu --attn-impl $impl --iters 10 --warmup 3 \
    --machine "$GPU" --json $OUT/step_$impl.json --profile $OUT/profile_$impl 2>&1 | tail -40
done
for method in odis ibot; do
  timeout 120 python3 -m cli train --shards .devdata/coco/shards -c configs/vit_small_coco.yaml --method $method \
    --out /tmp/runs/$method --max-steps 60 --quiet data.batch_size=128 data.num_workers=14 log_every=10 \
    checkpoint_every=100000 2>&1 | tail -5
  cp /tmp/runs/$method/metrics.csv $OUT/train_$method.csv 2>/dev/null
done
cp BENCHMARKS.md $OUT/BENCHMARKS.md
