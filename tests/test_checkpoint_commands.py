"""What the commands after a run take from its checkpoint: --checkpoint and hellaswag.py's
--checkpoint take a log dir for its newest checkpoint, so a command names a run without
knowing at which step it stopped."""
import os

import pytest

import checkpoint
import hellaswag
import train_gpt2
from common import run_cli
from conftest import EXAMPLES, write_jsonl

# the shakespeare preset, shrunk to a model that trains a step in a blink
SMALL = ["--preset", "shakespeare", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
         "--block-size", "64", "--seq-len", "32", "--total-batch-size", "128",
         "--val-tokens", "256", "--sample-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("resume") / "run")
    train_gpt2.main(SMALL + ["--max-steps", "2", "--log-dir", log_dir])
    return log_dir, os.path.join(log_dir, "model_00002.pt")


def test_checkpoint_names_a_log_dir(first_run, tmp_path, capsys):
    log_dir, _ = first_run
    assert checkpoint.newest_checkpoint(log_dir) == checkpoint.list_checkpoints(log_dir)[-1]
    train_gpt2.main(["--sample", "--checkpoint", log_dir, "--num-samples", "1",
                     "--max-new-tokens", "4"])
    assert "sample 0: Hello, I'm a language model," in capsys.readouterr().out
    jsonl = write_jsonl(tmp_path / "ex.jsonl", EXAMPLES[:2])
    assert run_cli(hellaswag.main, ["--checkpoint", log_dir, "--jsonl", jsonl,
                                    "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().startswith("2 acc: ")
    # a log dir without a checkpoint is one line
    (tmp_path / "empty").mkdir()
    assert run_cli(train_gpt2.main, ["--sample", "--checkpoint", str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err == (f"error: no checkpoint in {tmp_path / 'empty'}/: train "
                                       "first, or give a model_XXXXX.pt\n")
