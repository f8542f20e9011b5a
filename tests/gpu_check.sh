#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with one CUDA GPU (about 5 minutes on
# an H100; CI never runs it, it has no GPU):
#   1. bench.py ladder at GPT-2 (124M), B=16, T=1024: the lecture's rungs, ms/step and MFU;
#   2. HellaSwag batched (16 examples per forward) against one example per forward, with
#      GPT-2 (124M) random weights in bf16 on 500 synthetic examples (issue 4's >= 4x);
#   3. a few dozen steps of the real training loop, --preset gpt2 (B=64, T=1024, bf16,
#      torch.compile, fused AdamW) through torchrun, on shards made from input.txt, with
#      HellaSwag on a small local file and a checkpoint at the end.
# Usage: bash tests/gpu_check.sh [OUT_DIR]   (tables and logs go to OUT_DIR, default gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_out}
work=data/gpu_check
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/device.txt"

# 128Ki-token shards: every shard holds at least one B*T+1 window of the gpt2 preset
python fineweb.py --input input.txt --out-dir "$work/shards" --prefix shakespeare \
    --shard-size 131072 --workers 1
python -c "import sys; sys.path.insert(0, 'tests'); from conftest import EXAMPLES, write_jsonl; write_jsonl('$work/hella.jsonl', EXAMPLES)"

python bench.py ladder --json "$out/ladder.json" 2>&1 | tee "$out/ladder.txt"

python -c "
import bench
from train_gpt2 import GPT, GPTConfig
model = GPT(GPTConfig(vocab_size=50304)).eval()
for r in bench.bench_hellaswag(n=500, device='cuda', model=model):
    print(r.name, r.measured, r.target, r.detail)" 2>&1 | tee "$out/hellaswag.txt"

rm -rf "$work/log"
torchrun --standalone --nproc_per_node=1 train_gpt2.py --preset gpt2 \
    --data-dir "$work/shards" --log-dir "$work/log" --max-steps 40 --eval-every 20 \
    --hellaswag-every 20 --hellaswag-jsonl "$work/hella.jsonl" --sample-every 40 \
    --checkpoint-every 0 2>&1 | tee "$out/train.txt"
cp "$work/log/log.txt" "$out/log.txt"
