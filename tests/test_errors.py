"""Every entry point answers a user's mistake with one line on stderr and a non-zero exit,
never a traceback: train_gpt2.py, fineweb.py, hellaswag.py and bench.py, each run as a
subprocess the way a user runs it, with bad input of each kind it reads. Then the mistakes
of a training run's set-up, through train_gpt2.main in this process (cheaper)."""
import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train_gpt2
from common import UserError, run_cli
from conftest import EXAMPLES, ROOT, TINY, flip_a_bit, write_jsonl, write_token_shards

# (name, script and arguments, what the line says); {tmp} is the files written below
CASES = [
    ("train: bad flag value", ["train_gpt2.py", "--max-steps", "abc"],
     "invalid int value: 'abc'"),
    ("train: corrupt shard", ["train_gpt2.py", "--data-dir", "{tmp}/bad_shards", "--device",
                              "cpu", "--log-dir", "{tmp}/log"],
     "shorter than the 1024-byte header"),
    ("train: flipped bit in a checkpoint", ["train_gpt2.py", "--sample", "--checkpoint",
                                            "{tmp}/model_00001.pt"], "model_00001.pt is corrupt"),
    ("train: foreign checkpoint", ["train_gpt2.py", "--sample", "--checkpoint", "{tmp}/foreign.pt"],
     "is not a checkpoint of train_gpt2.py"),
    ("fineweb: bad flag value", ["fineweb.py", "--workers", "0"], "--workers 0 is out of range"),
    ("fineweb: missing file", ["fineweb.py", "--input", "{tmp}/nowhere.txt", "--out-dir",
                               "{tmp}/out"], "no such file"),
    ("hellaswag: malformed jsonl line", ["hellaswag.py", "--jsonl", "{tmp}/bad.jsonl"],
     "bad.jsonl:2: not valid JSON"),
    ("hellaswag: foreign checkpoint", ["hellaswag.py", "--checkpoint", "{tmp}/foreign.pt",
                                       "--jsonl", "{tmp}/good.jsonl"], "is not a checkpoint"),
    ("hellaswag: bad flag value", ["hellaswag.py", "--limit", "0"], "must be at least 1"),
    ("bench: unknown device", ["bench.py", "ladder", "--device", "tpu"], "unknown device 'tpu'"),
    ("bench: bad choice", ["bench.py", "cpu", "--only", "nosuch"], "invalid choice: 'nosuch'"),
]


def write_inputs(tmp):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "foreign.pt")
    torch.save({"kind": checkpoint.CHECKPOINT_KIND, "model": {"w": torch.randn(1000)}},
               tmp / "model_00001.pt")
    flip_a_bit(tmp / "model_00001.pt")
    (tmp / "bad_shards").mkdir()
    for name in ("bad_val_000000.bin", "bad_train_000001.bin"):
        (tmp / "bad_shards" / name).write_bytes(b"not a shard")
    good = write_jsonl(tmp / "good.jsonl", EXAMPLES[:2])
    (tmp / "bad.jsonl").write_text(open(good).readline() + "{not json\n")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # all cases at once: each is mostly the start of a Python process importing torch
    tmp = tmp_path_factory.mktemp("errors")
    write_inputs(tmp)
    procs = {name: subprocess.Popen([sys.executable] + [a.format(tmp=tmp) for a in args],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, args, _ in CASES}
    return {name: (p.communicate(timeout=120), p.returncode) for name, p in procs.items()}


@pytest.mark.parametrize("name,message", [(name, message) for name, _, message in CASES])
def test_one_line_no_traceback(results, name, message):
    (_, err), code = results[name]
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], err

# -----------------------------------------------------------------------------
# Where a training run writes: checked at start-up, before the data and the step-0 eval


def test_a_log_dir_that_is_a_file(tmp_path, capsys):
    log_file = tmp_path / "log"
    log_file.write_text("my notes")
    # no data at all: the log dir's error comes first
    status = run_cli(train_gpt2.main, TINY + ["--data-dir", str(tmp_path / "nowhere"),
                                              "--log-dir", str(log_file)])
    assert status == 1
    assert capsys.readouterr().err == (f"error: --log-dir {log_file} is a file, not a "
                                       "directory; choose another --log-dir\n")
    assert log_file.read_text() == "my notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_an_unwritable_log_dir(tmp_path, capsys):
    log_dir = tmp_path / "read-only"
    log_dir.mkdir()
    log_dir.chmod(0o500)
    status = run_cli(train_gpt2.main, TINY + ["--data-dir", str(tmp_path / "nowhere"),
                                              "--log-dir", str(log_dir)])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --log-dir {log_dir}: cannot write") and err.count("\n") == 1
    assert "permission denied" in err


def test_a_log_line_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        checkpoint.log_line(str(tmp_path / "file" / "log.txt"), 0, "train", 1.0)


def test_a_fresh_run_keeps_an_old_log_and_a_second_live_run_is_refused(shards, tmp_path,
                                                                          capsys):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "log.txt").write_text("0 train 6.25\n")  # a run that never saved a checkpoint
    with open(tmp_path / "out.txt", "w") as out:
        live = subprocess.Popen([sys.executable, "train_gpt2.py"] + TINY +
                                ["--max-steps", "100000", "--data-dir", shards,
                                 "--log-dir", str(log_dir)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        # wait until it trains: the old log renamed, a new one written up to step 1
        log = log_dir / "log.txt"
        while not (log_dir / "log.1.txt").exists() or "\n1 train" not in (
                log.read_text() if log.exists() else ""):
            assert live.poll() is None, (tmp_path / "out.txt").read_text()
            time.sleep(0.01)
        status = run_cli(train_gpt2.main, TINY + ["--data-dir", shards, "--log-dir",
                                                  str(log_dir)])
    finally:
        live.kill()
        live.wait()
    assert status == 1
    assert capsys.readouterr().err == (f"error: {log_dir}/ is in use by another training run; "
                                       "wait for it to finish, or use another directory\n")
    # the live run kept the old log under a new name and said so; the refused run moved
    # nothing
    assert (f"kept the log.txt already in {log_dir}/ as {log_dir}/log.1.txt\n"
            in (tmp_path / "out.txt").read_text())
    assert sorted(os.listdir(log_dir)) == ["log.1.txt", "log.txt"]
    assert (log_dir / "log.1.txt").read_text() == "0 train 6.25\n"
    assert (log_dir / "log.txt").read_text().startswith("0 val ")

# -----------------------------------------------------------------------------
# A model that cannot be built, data it cannot read, sampling and exports that cannot work


@pytest.mark.parametrize("flags,message", [
    (["--n-head", "0"], "--n-head must be at least 1, got 0"),
    (["--n-embd", "0"], "--n-embd must be at least 1, got 0"),
    (["--n-layer", "-1"], "--n-layer must be at least 1, got -1"),
    (["--sample", "--checkpoint", "x.pt", "--prompt", ""], "a non-empty --prompt"),
    (["--sample", "--checkpoint", "x.pt", "--top-k", "0"], "a --top-k of at least 1"),
])
def test_bad_model_and_sampling_flags(tmp_path, capsys, flags, message):
    try:
        status = run_cli(train_gpt2.main, TINY + ["--log-dir", str(tmp_path / "log")] + flags)
    except SystemExit as e:  # the parser's own errors
        status = e.code
    assert status in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_vocab_size_smaller_than_the_data(tmp_path, capsys):
    shards = write_token_shards(str(tmp_path / "shards"), vocab=1000)
    status = run_cli(train_gpt2.main, TINY + ["--data-dir", shards, "--log-dir",
                                              str(tmp_path / "log")])
    assert status == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test_val_000000.bin holds token id 9" in err, err
    assert "--vocab-size" in err


def test_export_and_plot_into_places_that_cannot_be_written(tmp_path, capsys):
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=8, vocab_size=50304, n_layer=1,
                                                n_head=1, n_embd=8))
    (tmp_path / "ckpt").mkdir()
    path = checkpoint.save_checkpoint({"model": model.state_dict(),
                                       "model_config": dataclasses.asdict(model.config),
                                       "run_id": "export"}, str(tmp_path / "ckpt"), 1)
    (tmp_path / "a file").write_text("")
    out_dir = tmp_path / "a file" / "export"
    assert run_cli(train_gpt2.main, ["--export-hf", str(out_dir), "--checkpoint", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --export-hf: cannot write {out_dir}/") and err.count("\n") == 1
    # --plot writes LOG_DIR/loss.png: here a directory stands in its way
    (tmp_path / "log.txt").write_text("0 train 6.25\n1 train 6.0\n")
    (tmp_path / "loss.png").mkdir()
    assert run_cli(train_gpt2.main, ["--plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --plot: cannot write {tmp_path}/loss.png")
    assert err.count("\n") == 1


@pytest.mark.parametrize("rank,printed", [("0", "interrupted\n"), ("1", "")])
def test_a_second_ctrl_c_under_torchrun_is_reported_once(monkeypatch, capsys, rank, printed):
    # a second Ctrl-C makes torchrun send SIGTERM to every rank: each stops at once
    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setenv("RANK", rank)
    assert run_cli(interrupted) == 130
    assert capsys.readouterr().err == printed
