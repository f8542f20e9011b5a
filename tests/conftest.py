"""Shared pieces of the tests: the repository root on sys.path, small token shards, and
running the real scripts in a subprocess."""
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Without a GPU, fused_ce.py's Triton kernels run in Triton's interpreter (test_fused_ce.py).
# Triton reads the switch once, when it is first imported, and transformers' models and
# torch.compile import it early, so it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# A GPT small enough that a training step takes milliseconds on a CPU; the flags go on
# top of the gpt2 preset, so the code path is the real one.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--vocab-size", "512", "--batch-size", "4", "--seq-len", "32",
        "--total-batch-size", "256", "--warmup-steps", "2", "--max-lr", "3e-3",
        "--eval-every", "4", "--val-tokens", "1024", "--sample-every", "0",
        "--hellaswag-every", "0", "--device", "cpu", "--no-compile"]


def write_token_shards(data_dir, n_train=3, tokens_per_shard=4096, vocab=512, seed=0):
    """val shard 0 and n_train train shards of a repetitive token stream (so a model can
    learn it), through fineweb.write_shard: the real format."""
    import fineweb
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    phrase = rng.integers(0, vocab, size=97)
    for i in range(n_train + 1):
        noise = rng.integers(0, vocab, size=tokens_per_shard)
        tokens = np.where(rng.random(tokens_per_shard) < 0.2, noise,
                          np.resize(phrase, tokens_per_shard)).astype(np.uint16)
        split = "val" if i == 0 else "train"
        fineweb.write_shard(os.path.join(data_dir, f"test_{split}_{i:06d}.bin"), tokens)
    return data_dir


@pytest.fixture
def shards(tmp_path):
    return write_token_shards(str(tmp_path / "shards"))


def run(args, timeout=300, cwd=None, env=None, check=True):
    """python ARGS... in the repository root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable] + args, cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for_line(proc, log_path, line):
    """Waits until the running proc has written `line` as a line of log_path."""
    while proc.poll() is None:
        if os.path.exists(log_path) and f"\n{line}" in open(log_path).read():
            return
        time.sleep(0.002)
    raise AssertionError(f"the run ended before logging {line!r}:\n{proc.communicate()[0]}")


def read_log(log_dir):
    """log.txt as [(step, stream, value)]."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        return [(int(a), b, float(c)) for a, b, c in (line.split() for line in f)]


# written for these tests, in the format of the real files (which also carry ctx_a,
# ctx_b, activity_label, ...: extra fields are ignored)
EXAMPLES = [
    {"ctx": "A woman pours flour into a bowl. She", "label": 1, "activity_label": "Baking",
     "endings": ["drives the bowl to the airport.", "cracks two eggs over it and stirs.",
                 "paints the ceiling blue.", "sings to the flour for an hour."]},
    {"ctx": "A boy kicks a ball across the field. His friend", "label": 0,
     "endings": ["stops it with his foot.", "eats the ball.",
                 "climbs into the goal and sleeps until the evening comes.", "is a ball."]},
    {"ctx": "The man ties his shoes.", "label": 2,
     "endings": ["The shoes fly away.", "He ties the shoes to the roof.",
                 "He stands up and starts jogging down the road.", "He."]},
    {"ctx": "A dog waits by the door. When its owner comes home, the dog", "label": 3,
     "endings": ["opens the fridge.", "writes a letter.", "plays the piano quietly.",
                 "jumps up and wags its tail."]},
    {"ctx": "Two people sit in a canoe on a calm lake. They", "label": 0,
     "endings": ["paddle slowly toward the shore.", "fly the canoe.",
                 "read the lake.", "turn the lake into a mountain of sand and stones."]},
    {"ctx": "A chef slices onions", "label": 2,
     "endings": ["into the sky.", "with a spoon of music.", "with a sharp knife.", "."]},
    {"ctx": "How to water a plant. Fill a watering can with water. Pour", "label": 1,
     "endings": ["the can into the oven.", "the water slowly around the base of the plant.",
                 "it on your head.", "sand instead of water until the can is empty."]},
    {"ctx": "A girl holds a kite on a windy hill. She", "label": 3,
     "endings": ["eats the kite.", "buries the kite.", "folds the hill.",
                 "runs and lets the wind lift the kite into the air."]},
    {"ctx": "The teacher writes a sum on the board. The students", "label": 0,
     "endings": ["copy it into their notebooks.", "erase the school.",
                 "throw the board out of the window and leave for the beach at once.", "!"]},
    {"ctx": "A cyclist reaches the top of a steep hill and", "label": 1,
     "endings": ["swims.", "rolls down the other side with a smile.", "melts.",
                 "becomes a hill."]},
]


def write_jsonl(path, examples):
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return str(path)


def flip_a_bit(path):
    """Flips one bit in the middle of the largest tensor's bytes in a torch.save file, as
    a failing disk or a bad copy would."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)  # a zip local header: 30 bytes, then name, extra
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(record.header_offset + 30 + name_len + extra_len + record.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


@pytest.fixture
def small_fs(tmp_path):
    """mount(size, options="") -> the path of a new tmpfs of that size ("700k"): a real
    filesystem that fills up or is read-only, as a user's disk does. Needs root, as the
    tests have here and in CI; skipped with the reason elsewhere. Unmounted afterwards."""
    mounted = []

    def mount(size, options=""):
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(
                [f"size={size}"] + ([options] if options else [])), "tmpfs", str(path)],
                capture_output=True, text=True)
            why = proc.stderr.strip() if proc.returncode else None
        except OSError as e:
            why = str(e)
        if why:
            pytest.skip(f"cannot mount a tmpfs here ({why})")
        mounted.append(path)
        return str(path)
    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def fill(directory):
    """Writes into directory until its filesystem is full."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
