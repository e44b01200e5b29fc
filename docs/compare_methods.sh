#!/usr/bin/env bash
# Compare every registered method on the medical pack's embedded sample, one command per method.
# Usage: bash docs/compare_methods.sh [EPOCHS] [METHOD ...]   (defaults: 5 epochs, every method)
set -euo pipefail
epochs=${1:-5}; shift || true
methods=("$@")
if [ ${#methods[@]} -eq 0 ]; then
  mapfile -t methods < <(python -m vision_ft methods --backbone vit_test_tiny --json | python -c "import json,sys; print('\n'.join(r['name'] for r in json.load(sys.stdin)))")
fi
printf "| method | trainable (backbone) | val acc | test acc | test macro-F1 | wall time |\n|---|---|---|---|---|---|\n"
for m in "${methods[@]}"; do
  start=$(date +%s)
  python -m vision_ft fit --config domains/medical.yaml --model.init_args.method="$m" \
      --trainer.max_epochs="$epochs" --trainer.enable_progress_bar=false \
      --trainer.logger.init_args.name="compare_$m" > "/tmp/compare_$m.log" 2>&1 || { echo "| $m | failed: see /tmp/compare_$m.log |"; continue; }
  secs=$(( $(date +%s) - start ))
  run=$(ls -d runs/compare_"$m"/version_* | sort -V | tail -1)
  python - "$run" "$m" "$secs" <<'PY'
import json, sys
meta = json.load(open(f"{sys.argv[1]}/adapter.json"))
m = meta["metrics"]
print(f"| {sys.argv[2]} | {meta['trainable_params']:,} | {m['val/acc']:.3f} | {m['test/acc']:.3f} | {m['test/f1']:.3f} | {sys.argv[3]} s |")
PY
done
