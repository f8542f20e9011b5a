"""The table of bad inputs: every row is a command a user might type, with a mistake in
it, and the words its one line of error must hold. Each must exit non-zero with exactly
one line on stderr and no traceback, before minutes of compute are spent, and must leave
every file that was there before as it was.

The rows call each script's main(argv) through run_cli in this process, as `python
SCRIPT` does: a Python process per row would spend seconds importing torch each time.
They run in a directory of their own, so a default --log-dir or --out-dir lands there too,
under the same check."""
import dataclasses
import hashlib
import os
import re

import pytest
import torch

import bench
import checkpoint
import config
import fineweb
import hellaswag
import train_gpt2
from common import run_cli
from conftest import EXAMPLES, TINY, flip_a_bit, write_jsonl, write_token_shards

SAMPLE = ["--sample", "--checkpoint", "{tmp}/good.pt"]
RESUME = TINY + ["--data-dir", "{tmp}/shards", "--resume"]

# (script, arguments, words the line must hold); {tmp} is the directory of write_inputs()
ROWS = [
    # training: a flag's value outside its range, or of the wrong type
    ("train_gpt2.py", ["--max-steps", "abc"], ["invalid int value: 'abc'"]),
    ("train_gpt2.py", ["--grad-clip", "-1"],
     ["--grad-clip -1 is out of range", "0 (no clipping) or above 0", "default 1"]),
    ("train_gpt2.py", ["--min-lr-ratio", "5"], ["--min-lr-ratio 5", "0 to 1", "default 0.1"]),
    ("train_gpt2.py", ["--weight-decay", "-1"], ["--weight-decay -1", "0 (none)", "default 0.1"]),
    ("train_gpt2.py", ["--warmup-steps", "-5"], ["--warmup-steps -5", "default 715"]),
    ("train_gpt2.py", ["--max-lr", "0"], ["--max-lr 0 is out of range", "above 0, at most 1"]),
    ("train_gpt2.py", ["--max-lr", "-1"], ["--max-lr -1", "default 0.0006"]),
    ("train_gpt2.py", ["--preset", "shakespeare", "--max-lr", "nan"],
     ["--max-lr nan", "default 0.002"]),  # the preset's default
    ("train_gpt2.py", ["--grad-clip", "inf"], ["--grad-clip inf is out of range"]),
    ("train_gpt2.py", ["--seed", "-1"], ["--seed -1", "0 to 18446744073709551615"]),
    ("train_gpt2.py", ["--n-head", "0"], ["--n-head 0", "at least 1", "default 12"]),
    ("train_gpt2.py", ["--batch-size", "0"], ["--batch-size 0", "at least 1"]),
    ("train_gpt2.py", ["--val-tokens", "0"], ["--val-tokens 0", "at least 1"]),
    ("train_gpt2.py", ["--dist-timeout", "0"], ["--dist-timeout 0", "1 to 10080"]),
    ("train_gpt2.py", ["--dist-timeout", "10000000000000"], ["1 to 10080"]),  # timedelta's end
    ("train_gpt2.py", ["--vocab-size", "70000"], ["--vocab-size 70000", "1 to 65536"]),
    ("train_gpt2.py", ["--keep-checkpoints", "-1"], ["--keep-checkpoints -1", "0 (all)"]),
    ("train_gpt2.py", ["--eval-every", "-1"], ["--eval-every -1", "0 (never)"]),
    ("train_gpt2.py", ["--preset", "gtp2"], ["invalid choice: 'gtp2'"]),
    # training: flags that do not fit together, or this machine
    ("train_gpt2.py", TINY + ["--seq-len", "64"], ["--seq-len 64 is longer than", "block size 32"]),
    ("train_gpt2.py", TINY + ["--total-batch-size", "1000"], ["not divisible by B*T"]),
    ("train_gpt2.py", TINY + ["--n-head", "3"], ["--n-embd 32 is not divisible by --n-head 3"]),
    ("train_gpt2.py", TINY + ["--device", "cuda:0"], ["no CUDA GPU"]),
    ("train_gpt2.py", TINY + ["--device", "tpu"], ["unknown device 'tpu'"]),
    ("train_gpt2.py", TINY + ["--fused-ce"], ["--fused-ce runs a Triton kernel", "not on cpu"]),
    # 512 TB of position embeddings: past any address space, so refused at once whatever
    # the kernel's overcommit policy
    ("train_gpt2.py", TINY + ["--block-size", str(2 ** 42), "--data-dir", "{tmp}/shards"],
     ["out of memory (DefaultCPUAllocator: can't allocate memory", "at micro-batch 4 x 32",
      "try --batch-size 2"]),
    # training: data, log dir and HellaSwag file that cannot be used
    ("train_gpt2.py", TINY + ["--data-dir", "{tmp}/bad_shards", "--log-dir", "{tmp}/log1"],
     ["shorter than the 1024-byte header"]),
    ("train_gpt2.py", TINY + ["--data-dir", "{tmp}/empty"], ["{tmp}/empty", "shards"]),
    ("train_gpt2.py", TINY + ["--data-dir", "{tmp}/nowhere"], ["{tmp}/nowhere", "shards"]),
    ("train_gpt2.py", TINY + ["--log-dir", "{tmp}/notes.txt"], ["is a file, not a directory"]),
    ("train_gpt2.py", TINY + ["--data-dir", "{tmp}/shards", "--hellaswag-every", "1",
                              "--hellaswag-jsonl", "{tmp}/nowhere.jsonl"], ["no such file"]),
    # --sample
    ("train_gpt2.py", ["--sample"], ["--sample needs --checkpoint"]),
    ("train_gpt2.py", ["--sample", "--checkpoint", "{tmp}/model_00001.pt"],
     ["model_00001.pt is corrupt"]),
    ("train_gpt2.py", ["--sample", "--checkpoint", "{tmp}/foreign.pt"],
     ["is not a checkpoint of train_gpt2.py"]),
    ("train_gpt2.py", ["--sample", "--checkpoint", "{tmp}/nowhere.pt"], ["no checkpoint at"]),
    ("train_gpt2.py", ["--sample", "--checkpoint", "{tmp}/empty"], ["no checkpoint in"]),
    ("train_gpt2.py", SAMPLE + ["--num-samples", "0"], ["--num-samples 0", "default 4"]),
    ("train_gpt2.py", SAMPLE + ["--max-new-tokens", "-1"], ["--max-new-tokens -1"]),
    ("train_gpt2.py", SAMPLE + ["--temperature", "nan"], ["--temperature nan", "0 (greedy)"]),
    ("train_gpt2.py", SAMPLE + ["--temperature", "-0.5"], ["--temperature -0.5"]),
    ("train_gpt2.py", SAMPLE + ["--temperature", "1e-300"], ["at least 0.01"]),  # logits overflow
    ("train_gpt2.py", SAMPLE + ["--top-k", "0"], ["--top-k 0", "default 50"]),
    ("train_gpt2.py", SAMPLE + ["--prompt", ""], ["a non-empty --prompt"]),
    # --export-hf
    ("train_gpt2.py", ["--export-hf", "{tmp}/hf"], ["--export-hf needs --checkpoint"]),
    ("train_gpt2.py", ["--export-hf", "{tmp}/notes.txt/hf", "--checkpoint", "{tmp}/good.pt"],
     ["cannot write {tmp}/notes.txt/hf/", "a file stands where a directory should be"]),
    ("train_gpt2.py", ["--export-hf", "{tmp}/hf", "--checkpoint", "{tmp}/truncated.pt"],
     ["truncated"]),
    # --plot
    ("train_gpt2.py", ["--plot", "{tmp}/empty"], ["no log.txt in {tmp}/empty/"]),
    ("train_gpt2.py", ["--plot", "{tmp}/plot"],
     ["cannot write {tmp}/plot/loss.png", "a directory stands where a file should be"]),
    # --resume
    ("train_gpt2.py", RESUME + ["--log-dir", "{tmp}/empty"], ["no checkpoint in {tmp}/empty/"]),
    ("train_gpt2.py", RESUME + ["--log-dir", "{tmp}/run", "--n-layer", "3"],
     ["was trained with --n-layer 2"]),
    ("train_gpt2.py", RESUME + ["--log-dir", "{tmp}/run", "--max-steps", "0"],
     ["--max-steps 0 is out of range"]),
    ("train_gpt2.py", RESUME + ["--log-dir", "{tmp}/run", "--checkpoint-every", "-2"],
     ["--checkpoint-every -2", "0 (the last only)"]),
    ("train_gpt2.py", TINY + ["--resume", "{tmp}/run/model_00001.pt"],
     ["newer model_00002.pt", "--rewind goes back"]),
    ("train_gpt2.py", TINY + ["--rewind"], ["--rewind goes with --resume PATH"]),
    ("train_gpt2.py", TINY + ["--resume", "{tmp}/foreign.pt"], ["is not a checkpoint"]),
    # fineweb.py
    ("fineweb.py", ["--workers", "0"], ["--workers"]),
    ("fineweb.py", ["--shard-size", "0"], ["--shard-size"]),
    ("fineweb.py", ["--input", "{tmp}/nowhere.txt", "--out-dir", "{tmp}/out1"], ["no such file"]),
    ("fineweb.py", ["--input", "{tmp}/notext.jsonl", "--out-dir", "{tmp}/out2"], ["text"]),
    ("fineweb.py", ["--input", "{tmp}/latin1.txt", "--out-dir", "{tmp}/out3"], ["UTF-8"]),
    # hellaswag.py
    ("hellaswag.py", ["--jsonl", "{tmp}/bad.jsonl"], ["bad.jsonl:2: not valid JSON"]),
    ("hellaswag.py", ["--jsonl", "{tmp}/nowhere.jsonl"], ["no such file"]),
    ("hellaswag.py", ["--checkpoint", "{tmp}/foreign.pt", "--jsonl", "{tmp}/good.jsonl"],
     ["is not a checkpoint"]),
    ("hellaswag.py", ["--limit", "0"], ["--limit 0 is out of range", "at least 1", "default all"]),
    ("hellaswag.py", ["--batch-size", "-1"], ["--batch-size -1", "default 16"]),
    ("hellaswag.py", ["--limit", "nan"], ["invalid int value: 'nan'"]),
    ("hellaswag.py", ["--split", "test"], ["labels are not public"]),
    ("hellaswag.py", ["--split", "val", "--jsonl", "{tmp}/good.jsonl"], ["not allowed with"]),
    ("hellaswag.py", ["--jsonl", "{tmp}/good.jsonl", "--device", "cuda"], ["no CUDA GPU"]),
    # bench.py
    ("bench.py", ["ladder", "--device", "tpu"], ["unknown device 'tpu'"]),
    ("bench.py", ["cpu", "--only", "nosuch"], ["invalid choice: 'nosuch'"]),
]

PROGRESS = re.compile(r"\[\d\d:\d\d")  # tqdm's elapsed time: "[00:00, 3.1MB/s]"

MAINS = {"train_gpt2.py": train_gpt2.main, "fineweb.py": fineweb.main,
         "hellaswag.py": hellaswag.main, "bench.py": bench.main}


def tiny_checkpoint(log_dir, step, run_id, vocab_size=50304):
    cfg, _ = config.parse_config(TINY + ["--vocab-size", str(vocab_size)])
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=8, vocab_size=vocab_size,
                                                n_layer=2, n_head=1, n_embd=8))
    return checkpoint.save_checkpoint({"model": model.state_dict(), "run_id": run_id,
                                       "model_config": dataclasses.asdict(model.config),
                                       "config": dataclasses.asdict(cfg)}, str(log_dir), step)


def write_inputs(tmp):
    os.replace(tiny_checkpoint(tmp, 1, "good"), tmp / "good.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "foreign.pt")
    torch.save({"kind": checkpoint.CHECKPOINT_KIND, "model": {"w": torch.randn(1000)}},
               tmp / "model_00001.pt")
    flip_a_bit(tmp / "model_00001.pt")
    for name in ("bad_shards", "empty", "run", "plot/loss.png"):
        (tmp / name).mkdir(parents=True)
    for name in ("bad_val_000000.bin", "bad_train_000001.bin"):
        (tmp / "bad_shards" / name).write_bytes(b"not a shard")
    write_token_shards(str(tmp / "shards"))
    (tmp / "truncated.pt").write_bytes((tmp / "good.pt").read_bytes()[:5000])
    for step in (1, 2):  # a run of the TINY configuration
        tiny_checkpoint(tmp / "run", step, "run", vocab_size=512)
    (tmp / "run" / "log.txt").write_text("0 train 6.25\n1 train 6.0\n")
    (tmp / "plot" / "log.txt").write_text("0 train 6.25\n1 train 6.0\n")
    (tmp / "notes.txt").write_text("my notes")
    good = write_jsonl(tmp / "good.jsonl", EXAMPLES[:2])
    (tmp / "bad.jsonl").write_text(open(good).readline() + "{not json\n")
    (tmp / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (tmp / "latin1.txt").write_bytes("café au lait, s'il vous plaît\n".encode("latin-1"))


def hashes(directory):
    """{path: sha256} of every file under directory."""
    found = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    write_inputs(tmp)
    return tmp


def test_the_table_covers_every_entry_point():
    assert len(ROWS) >= 40
    commands = [args[0] if script == "train_gpt2.py" and args[0] in (
        "--sample", "--export-hf", "--plot") else script for script, args, _ in ROWS]
    for command in ("--sample", "--export-hf", "--plot", "fineweb.py", "hellaswag.py"):
        assert command in commands
    assert sum("--resume" in args for _, args, _ in ROWS) >= 5


@pytest.mark.parametrize("script,args,words", ROWS,
                         ids=[f"{s} {' '.join(a)}".replace(" ".join(TINY), "TINY")[:80]
                              for s, a, _ in ROWS])
def test_one_line_no_traceback_files_untouched(inputs, monkeypatch, capsys, script, args,
                                               words):
    monkeypatch.chdir(inputs)  # defaults like --log-dir log land here, under the check
    before = hashes(inputs)
    try:
        status = run_cli(MAINS[script], [a.format(tmp=inputs) for a in args])
    except SystemExit as e:  # argparse's own errors leave parse_args by sys.exit
        status = e.code
    out, err = capsys.readouterr()
    assert status not in (0, None), err
    assert "Traceback" not in out + err, out + err
    # a progress bar, redrawn in place with \r, is not a line of the error
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and not PROGRESS.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word.format(tmp=inputs) in lines[0], err
    after = hashes(inputs)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing changed or gone
