#!/usr/bin/env bash
# What only a GPU can show, in one short run (aim: under 8 minutes on one GPU):
#   1. 16-mixed and bf16-mixed fits of the medical and CLIP configs (finite losses, metrics written);
#   2. `bench train --device cuda` for lora, ssf and full fine-tuning (the reference) on ViT-B/16;
#   3. the FSDP fragment (configs/trainer/fsdp.yaml) on one device, adapter written and loadable;
#   4. the export round trip on the GPU: fit, export --merge, load in timm alone, logits within 1e-4.
# Usage (from the repository root, the environment active):  bash scripts/gpu_check.sh [OUT_DIR]
# Every step prints PASS/FAIL with its wall time; the script exits non-zero if any step failed.
# GPU_CHECK_DEVICE=cpu runs the same command lines on the CPU (bf16 only, tiny bench, no FSDP): a check
# of the script itself on a machine without a GPU, not a substitute for the GPU run.
set -uo pipefail
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PY=${PYTHON:-python} OUT
DEVICE=${GPU_CHECK_DEVICE:-cuda}
failed=0
started=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "PASS $name ($(( $(date +%s) - t0 )) s)"
  else
    echo "FAIL $name ($(( $(date +%s) - t0 )) s, exit $?): tail of $OUT/$name.log"; tail -n 15 "$OUT/$name.log"
    failed=1
  fi
}

check_run() {  # check_run RUNS_DIR: the newest run's adapter.json has finite metrics
  $PY - "$1" <<'PYCHECK'
import json, math, sys
from pathlib import Path
runs = sorted(Path(sys.argv[1]).rglob("adapter.json"), key=lambda p: p.stat().st_mtime)
assert runs, f"no adapter.json under {sys.argv[1]}"
metrics = json.loads(runs[-1].read_text())["metrics"]
assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
print(runs[-1].parent, {k: round(v, 4) for k, v in sorted(metrics.items())})
PYCHECK
}
export -f check_run

if [ "$DEVICE" = cuda ]; then
  $PY - <<'PYGPU' || { echo "FAIL: no CUDA device visible to torch"; exit 2; }
import torch
assert torch.cuda.is_available()
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
PYGPU
  ACCEL=gpu; PRECISIONS="16-mixed bf16-mixed"; BENCH_BACKBONE=vit_base_patch16_224
else
  ACCEL=cpu; PRECISIONS="bf16-mixed"; BENCH_BACKBONE=vit_test_tiny
fi

GPU_ARGS=(--trainer.accelerator=$ACCEL --trainer.devices=1 --trainer.enable_progress_bar=false)
[ "$DEVICE" = cuda ] || GPU_ARGS+=(--trainer.limit_train_batches=2 --trainer.limit_val_batches=1 --trainer.limit_test_batches=1)
# 1. mixed precision fits (2 epochs each: the point is that the steps run and stay finite)
for precision in $PRECISIONS; do
  step "medical_$precision" 150 bash -c "$PY -m vision_ft fit --config domains/medical.yaml ${GPU_ARGS[*]} \
      --trainer.precision=$precision --trainer.max_epochs=2 --trainer.logger.init_args.save_dir=$OUT/medical_$precision \
      --data.init_args.sample_dir=$OUT/sample && check_run $OUT/medical_$precision"
  step "clip_$precision" 120 bash -c "$PY -m vision_ft fit --config domains/clip_few_shot.yaml ${GPU_ARGS[*]} \
      --trainer.precision=$precision --trainer.max_epochs=2 --trainer.logger.init_args.save_dir=$OUT/clip_$precision \
      && check_run $OUT/clip_$precision"
done

# 2. step time and memory on ViT-B/16 (full fine-tuning is always measured as the reference)
step bench_train_$DEVICE 180 $PY -m vision_ft bench train --device "$DEVICE" --methods lora ssf \
    --backbone "$BENCH_BACKBONE" --out "$OUT/bench" --json

# 3. FSDP on one device (the sharded code path: gathered adapter written by rank 0)
[ "$DEVICE" = cuda ] && step fsdp_one_device 120 bash -c "$PY -m vision_ft fit --config domains/medical.yaml --config configs/trainer/fsdp.yaml \
    --trainer.devices=1 --trainer.max_epochs=1 --trainer.limit_train_batches=4 --trainer.limit_val_batches=2 \
    --trainer.enable_progress_bar=false --trainer.logger.init_args.save_dir=$OUT/fsdp --data.init_args.sample_dir=$OUT/sample \
    && check_run $OUT/fsdp"

# 4. export round trip on the GPU
step export_roundtrip 120 bash -c "$PY -m vision_ft fit --config domains/medical.yaml ${GPU_ARGS[*]} --trainer.max_epochs=1 \
    --trainer.logger.init_args.save_dir=$OUT/export --data.init_args.sample_dir=$OUT/sample \
  && run=\$(dirname \$(ls -t $OUT/export/medical/version_*/adapter.json | head -1)) \
  && $PY -m vision_ft export \$run --merge --out $OUT/export/merged \
  && $PY - \$run $OUT/export/merged <<'PYEXPORT'
import sys
import timm
import torch
import vision_ft
run, merged = sys.argv[1:3]
device = 'cuda' if torch.cuda.is_available() else 'cpu'
task = vision_ft.load_adapter(run, device=device)
native = timm.create_model(f'local-dir:{merged}', pretrained=True).to(device).eval()
x = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(0)).to(device)
with torch.no_grad():
    diff = (task(x) - native(task.backbone.preprocess(x))).abs().max().item()
print(f'max |logit difference| on {device}:', diff)
assert diff < 1e-4, diff
PYEXPORT"

echo "total $(( $(date +%s) - started )) s; logs in $OUT"
exit $failed
