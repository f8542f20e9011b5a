"""What the commands after a run take from its checkpoint. --resume takes the model's shape
and the training's configuration from it: a resumed run needs none of the flags it was
started with, a new --max-steps says what it does to the learning rate, and a flag that
would change the model is refused. --checkpoint and hellaswag.py's --checkpoint take a log
dir for its newest checkpoint, so a command names a run without knowing at which step it
stopped."""
import os

import pytest

import checkpoint
import hellaswag
import train_gpt2
from common import run_cli
from conftest import EXAMPLES, SHAKESPEARE_TINY, write_jsonl



@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("resume") / "run")
    train_gpt2.main(SHAKESPEARE_TINY + ["--max-steps", "2", "--log-dir", log_dir])
    return log_dir, os.path.join(log_dir, "model_00002.pt")


def test_checkpoint_names_a_log_dir(first_run, tmp_path, capsys):
    log_dir, _ = first_run
    assert checkpoint.read_run_checkpoint(log_dir)["step"] == \
        checkpoint.checkpoint_step(checkpoint.list_checkpoints(log_dir)[-1])
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


def test_resume_path_alone_continues_with_the_checkpoints_configuration(first_run, capsys):
    log_dir, path = first_run
    capsys.readouterr()
    # no preset, no shape, no --log-dir: all of it comes from the checkpoint
    train_gpt2.main(["--resume", path, "--max-steps", "4"])
    out = capsys.readouterr().out
    assert f"resuming from {path} at step 2 (preset shakespeare)" in out
    assert "--max-steps 4 instead of 2: the cosine now ends at step 4, so the learning rate " \
           "at step 2 is " in out
    assert "step     3 | loss" in out and "elapsed, ETA 0:00:00" in out and "\ndone in 0:00:" in out
    ckpt = checkpoint.read_checkpoint(os.path.join(log_dir, "model_00004.pt"))
    assert ckpt["model_config"]["n_layer"] == 2 and ckpt["config"]["preset"] == "shakespeare"
    assert ckpt["config"]["max_steps"] == 4 and ckpt["config"]["total_batch_size"] == 128


def test_resume_refuses_another_shape(first_run, capsys):
    _, path = first_run
    assert run_cli(train_gpt2.main, ["--resume", path, "--n-layer", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{path} was trained with --n-layer 2 (preset shakespeare)" in err
    assert "drop --n-layer" in err
