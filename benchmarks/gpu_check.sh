#!/usr/bin/env bash
# The GPU checks, in one script for a lent H100/H200 (no network, no pip install of this repo). PARTS picks them, in
# the order given (default "check step train"), so that the most wanted one runs first and a run cut short still
# answers it:
#   check  odis.model.check_obj_mask (the trainer's start-up check) for mask/split x bf16/fp16 on ViT-S/16 (seconds);
#   step   step time odis vs ibot (bf16, ViT-S/16, batch 64, 2x224 + 10x96) in the runs STEP_RUNS names (below);
#          one profiled step of odis and ibot each (operator tables: where odis's extra time goes), and the SDPA
#          backends with the OBJ mask against the unmasked floor (~1 min a run eager, a few more compiling);
#   experiment  `odis experiment run experiments/mini_repro.yaml --preset gpu` (the miniature reproduction, 5 seeds,
#          six runs at a time) for EXP_BUDGET_S (480) at most, then the report of the runs that finished (a rerun
#          of the part continues them); results.md/.json into $OUT, the runs' logs and metrics into aux.tgz
#          (EXP_PRESET=smoke EXP_DEVICE=cpu: the same path on a CPU machine, in a minute, to check it before;
#          the data is .devdata/exp-$EXP_PRESET's where prepared, else made there);
#   mini   benchmarks/mini_repro.py --preset gpu (DINO vs iBOT vs ODIS, 3 seeds, ~6 min; its own time guard);
#   train  if .devdata/coco/base holds shards: end-to-end training img/s with 14 loader workers (ODIS and iBOT), on 24
#          symlinked copies of each tar (3,840 samples from the 160 real COCO images: an epoch is 30 steps of 128).
#          The recipe compiles (model.compile=true: the first ~10 steps); TRAIN_ARGS: more overrides
#          (model.compile=false: eager), TRAIN_STEPS (60), TRAIN_TIMEOUT_S (120 per method).
#   extract  benchmarks/extract.py --device cuda: the one-machine path against a bare ultralytics GPU loop, GPU
#          utilisation, 1/2/4/8 decode threads, the Ray job with 1 and 2 workers; yolo11n's architecture with random
#          weights (the weights at hand are CPU-only int8), timing only; then --scaling 1,2,4,8,16 on the CPUs with
#          yolov8n int8. Needs ultralytics and openvino on the device (carry their wheels in .whl) and ODIS_SHARED.
# STEP_RUNS picks the step runs, in order: each the attention implementation, then step.py's flags, a comma for a
# space. Default: mask compiled (the GPU recipes' setting), the same with CUDA graphs (--compile-mode
# reduce-overhead), mask eager, split eager (~5 min in all; with check and train ~9 min). --obj-row
# efficient|cudnn|math adds odis variants whose split OBJ row runs on that SDPA backend only.
# Prepare here (CPU machine), then carry .devdata/exp-gpu, .devdata/mini_repro/gpu, .devdata/coco/base and .whl:
#   odis experiment prepare experiments/mini_repro.yaml --preset gpu --out .devdata/exp-gpu
#   python3 benchmarks/mini_repro.py prepare --preset gpu
#   D=../shared/data/coco_tiny; for s in train val; do
#     odis import-boxes --format coco --images $D/${s}2017 --annotations $D/annotations/instances_${s}2017.json \
#       --out .devdata/coco/$s.parquet --from-segmentation
#     odis shard --images $D/${s}2017 --out .devdata/coco/$s --labels coco --manifest .devdata/coco/$s.parquet
#     mkdir -p .devdata/coco/base && cp .devdata/coco/$s/$s-000000.tar .devdata/coco/base/$s.tar
#   done
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl timm==1.0.31 webdataset==1.0.2 braceexpand==0.1.7
# There:  OUT=/some/dir PARTS="step mini" bash benchmarks/gpu_check.sh   (MINI_BUDGET_S: mini_repro's guard, 420)
# The device tool returns at most 8 files from $OUT: there go gpu.txt, BENCHMARKS.md, step_*.json (3), mini_repro.md
# and .json (or experiment_results.md and .json); everything else (profiles, logs, metrics) goes into
# $OUT/aux.tgz, packed again after every part, so that a run cut short still returns what it had.
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
# The package as pyproject.toml's package-dir lays it out, without installing: odis/ plus its subpackages that live
# beside it (pipelines/, trainer/, cli/, configs/), linked into /tmp/src/odis. PYTHONSAFEPATH keeps the checkout's
# bare odis/ (the current folder, or a script's) off the front of sys.path, in the subprocesses too.
rm -rf /tmp/src && mkdir -p /tmp/src/odis
ln -s "$PWD"/odis/* /tmp/src/odis/
for sub in pipelines trainer cli configs; do ln -s "$PWD/$sub" /tmp/src/odis/$sub; done
export PYTHONSAFEPATH=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/src:/tmp/site
else
  export PYTHONPATH=/tmp/src${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, timm, sys; print(sys.version.split()[0], torch.__version__, timm.__version__)" \
  | tee -a $OUT/gpu.txt
python3 -c "import odis.cli, odis.trainer.train, odis.pipelines.experiment; print('odis imports: ok')" 2>&1 | tail -1 | tee -a $OUT/gpu.txt
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
AUX=/tmp/aux
rm -rf $AUX && mkdir -p $AUX  # a machine kept warm still holds the last call's files

pack() {  # a new archive replaces the old one whole: a run cut off while packing keeps the previous one
  tar czf $OUT/.aux.tgz.tmp -C $AUX . && mv $OUT/.aux.tgz.tmp $OUT/aux.tgz
  cp BENCHMARKS.md $OUT/BENCHMARKS.md
}

check() {
  python3 - <<'PY' 2>&1 | tee -a $OUT/gpu.txt
import torch
from odis.model import OdisViT, check_obj_mask
m = OdisViT("vit_small_patch16_224", 224).cuda()
for impl in ("mask", "split"):
    m.attn_impl = impl
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            print(f"check_obj_mask {impl} {dtype}: {check_obj_mask(m) or 'ok'}")
PY
}

mini() {
  if [ -d .devdata/mini_repro/gpu ]; then
    timeout $(( ${MINI_BUDGET_S:-420} + 40 )) python3 benchmarks/mini_repro.py run --preset gpu \
      --data .devdata/mini_repro --results /tmp/mr --budget-s ${MINI_BUDGET_S:-420} 2>&1 | tee $AUX/mini_repro.log
    cp /tmp/mr/mini_repro.md /tmp/mr/mini_repro.json $OUT/ 2>/dev/null
    cp /tmp/mr/BENCHMARKS-row.md $AUX/ 2>/dev/null
    (cd /tmp/mr && tar czf $AUX/mini_logs.tgz logs runs/*/metrics.csv 2>/dev/null)
  fi
}

experiment() {
  local preset=${EXP_PRESET:-gpu}
  mkdir -p /tmp/exp && [ -d .devdata/exp-$preset/data ] && cp -rn .devdata/exp-$preset/data /tmp/exp/
  timeout ${EXP_BUDGET_S:-480} python3 -m odis experiment run experiments/mini_repro.yaml --preset $preset \
    --out /tmp/exp --device ${EXP_DEVICE:-cuda} 2>&1 | tee $AUX/experiment.log | grep '^\[experiment\]'
  python3 -m odis experiment report /tmp/exp > /dev/null 2>&1
  cp /tmp/exp/results.md $OUT/experiment_results.md 2>/dev/null
  cp /tmp/exp/results.json $OUT/experiment_results.json 2>/dev/null
  (cd /tmp/exp && tar czf $AUX/experiment_runs.tgz runs/*/metrics.csv runs/*/train.log runs/*/result.json 2>/dev/null)
}

step() {
  # each run: the attention implementation, then step.py's flags; --compile runs get the longer time limit
  for run in ${STEP_RUNS:-mask,--compile,--no-reference mask,--compile,--compile-mode,reduce-overhead,--no-reference mask split}; do
    set -- ${run//,/ }
    impl=$1
    shift
    case " $* " in
      *" --compile "*) tag=${impl}_compiled; limit=${COMPILE_TIMEOUT_S:-300} ;;  # compiling: minutes
      *) tag=$impl; limit=${STEP_TIMEOUT_S:-70} ;;
    esac
    flags=" $* "
    case $flags in *" --compile-mode "*) mode=${flags##*--compile-mode }; tag=${tag}_${mode%% *} ;; esac
    timeout $limit python3 benchmarks/step.py --preset gpu --attn-impl $impl "$@" --iters ${STEP_ITERS:-20} \
      --warmup 3 --machine "$GPU" --json $OUT/step_$tag.json --profile $AUX/profile_$tag 2>&1 | tail -30
    pack
  done
}

train() {
  if ls .devdata/coco/base/*.tar >/dev/null 2>&1; then
    rm -rf /tmp/coco_shards && mkdir -p /tmp/coco_shards
    for i in $(seq -w 0 23); do
      for t in .devdata/coco/base/*.tar; do ln -s $PWD/$t /tmp/coco_shards/c$i-$(basename $t); done
    done
    for method in odis ibot; do
      timeout ${TRAIN_TIMEOUT_S:-120} python3 -m odis train --shards /tmp/coco_shards -c configs/vit_small_coco.yaml \
        --method $method --out /tmp/runs/$method --max-steps ${TRAIN_STEPS:-60} --quiet data.batch_size=128 \
        data.num_workers=14 log_every=10 checkpoint_every=100000 ${TRAIN_ARGS:-} 2>&1 | tail -5
      cp /tmp/runs/$method/metrics.csv $AUX/train_$method.csv 2>/dev/null
    done
  fi
}

extract() {
  timeout ${EXTRACT_TIMEOUT_S:-300} python3 benchmarks/extract.py --device cuda --random-weights yolo11n.yaml \
    --imgsz 640 --threads 1,2,4,8 --big 0 --machine "$GPU" 2>&1 | tail -3
  timeout ${EXTRACT_TIMEOUT_S:-300} python3 benchmarks/extract.py --scaling 1,2,4,8,16 --big 0 \
    --machine "16-core CPU of the $GPU device machine" 2>&1 | tail -3
}

for part in ${PARTS:-check step train}; do
  "$part"
  pack
done
