#!/usr/bin/env bash
# The prepared GPU check (issue: "Fast on every device"): on a fresh CUDA machine, from the repo root,
#   bash tests/gpu/check.sh            # writes $OUT (default gpu_check/): bench.json, logs, summary.txt
# 1. installs what it needs; 2. pytest -m gpu; 3. the bench (fp32, bf16, compile on and off) at the GPT-2 124M
# shape; 4. a 200-step bf16 training run; then prints one summary table. Budget: under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || python -m pip install -q torch                       # a CUDA build of torch
python -m pip install -q -e ".[dev]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"

python -m gpt_lightning.bench model=gpt2 attention=gqa attention.n_heads=12 attention.kv_groups=4 \
    data.batch_size=8 bench.compile=true bench.steps=10 bench.warmup_steps=3 bench.repeats=3 \
    bench.json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"

BOOKS=$(python tests/gpu/make_corpus.py "$OUT/data")
start=$(date +%s)
python -m gpt_lightning.train trainer=gpu attention=gqa "$BOOKS" data.root="$OUT/data" data.encoding=bytes \
    data.batch_size=32 model.block_size=256 trainer.max_steps=200 trainer.val_check_interval=100 \
    callbacks.progress_bar.refresh_rate=50 hydra.run.dir="$OUT/train_run" > "$OUT/train.txt" 2>&1
echo "train_seconds=$(( $(date +%s) - start ))" >> "$OUT/train.txt"

python - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
b = json.loads((out / "bench.json").read_text())
s = json.loads((out / "train_run" / "summary.json").read_text())
print(f"GPU: {(out / 'gpu.txt').read_text().strip()}   torch {b['torch']}")
print(f"{'training tokens/s':<44} {'median':>10} {'MFU (spec)':>11}")
for k, v in b["training_tokens_per_sec"].items():
    mfu = f"{v['mfu_spec_peak']:.0%}" if v.get("mfu_spec_peak") else "-"
    print(f"{k:<44} {v['median']:>10.0f} {mfu:>11}")
for k, v in b["decode_tokens_per_sec"].items():
    print(f"decode {k:<37} {v['median']:>10.1f}")
for k, v in b["ratios"].items():
    print(f"ratio {k:<38} {v:>10.2f}")
print(f"200-step bf16 run: val/loss {s['val_loss']:.4f}, test/ppl {s['test_ppl']:.2f}, "
      f"{s['train_tokens_per_sec']:.0f} tokens/s, decode {s['decode_tokens_per_sec']:.0f} tokens/s")
PY
