"""Checkpoints: exact resume after a SIGKILL at any moment, atomic saves, loading that
runs no code, clear errors, and export to Hugging Face transformers."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train_gpt2
from common import run_cli
from conftest import ROOT, TINY, flip_a_bit, read_log, run, wait_for_line

N = 6  # checkpoint at step N, runs of 2N steps
RUN = TINY + ["--max-steps", str(2 * N), "--checkpoint-every", str(N), "--eval-every", "4",
              "--keep-checkpoints", "0", "--total-batch-size", "1024"]  # 8 micro steps


def env():
    # the same thread count in every run: float sums are then bitwise reproducible
    return dict(os.environ, OMP_NUM_THREADS="1")


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import write_token_shards
    tmp = tmp_path_factory.mktemp("resume")
    shards = write_token_shards(str(tmp / "shards"))
    log_dir = str(tmp / "straight")
    run(["train_gpt2.py"] + RUN + ["--data-dir", shards, "--log-dir", log_dir], env=env())
    return shards, log_dir, tmp


@pytest.mark.parametrize("attempt", range(2))  # two random moments; tests of Ctrl-C add more
def test_sigkill_then_resume_is_bitwise_identical(reference, attempt):
    shards, straight, tmp = reference
    log_dir = str(tmp / f"killed{attempt}")
    args = [sys.executable, "train_gpt2.py"] + RUN + ["--data-dir", shards, "--log-dir", log_dir]
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # kill it at a random moment between the checkpoint at step N and the end: after the
    # train line of step N + k, plus a random fraction of a step
    rng = random.Random(attempt)
    k, delay = rng.randrange(0, N - 2), rng.uniform(0, 0.03)
    log_path = os.path.join(log_dir, "log.txt")
    while proc.poll() is None:
        if os.path.exists(log_path) and f"\n{N + k} train" in open(log_path).read():
            break
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # whatever moment it died, every file under a checkpoint name is whole
    for path in checkpoint.list_checkpoints(log_dir):
        checkpoint.read_checkpoint(path)
    out = run(["train_gpt2.py"] + RUN + ["--data-dir", shards, "--log-dir", log_dir,
                                         "--resume"], env=env())
    assert f"resuming from {log_dir}/model_{N:05d}.pt at step {N}" in out.stdout
    a, b = read_log(straight), read_log(log_dir)
    assert a == b  # every train and val line, bitwise, and nothing twice
    last = f"model_{2 * N:05d}.pt"
    wa, wb = weights(os.path.join(straight, last)), weights(os.path.join(log_dir, last))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_of_a_finished_run_and_bad_resumes(reference, tmp_path, capsys):
    shards, straight, _ = reference
    ckpt = os.path.join(straight, f"model_{N:05d}.pt")
    # model flags that disagree with the checkpoint
    assert run_cli(train_gpt2.main, RUN + ["--data-dir", shards, "--log-dir", str(tmp_path / "x"),
                                           "--resume", ckpt, "--n-layer", "3"]) == 1
    assert "trained with --n-layer 2 (preset gpt2)" in capsys.readouterr().err
    # a fresh run into a log dir that holds a run's checkpoints would overwrite them
    assert run_cli(train_gpt2.main, RUN + ["--data-dir", shards, "--log-dir", straight]) == 1
    assert "continue it with --resume" in capsys.readouterr().err
    # resuming a run that reached --max-steps trains nothing and says so
    done = str(tmp_path / "done")
    shutil.copytree(straight, done)
    train_gpt2.main(RUN + ["--data-dir", shards, "--log-dir", done, "--resume"])
    assert f"the run is complete: step {2 * N} of --max-steps {2 * N}" in capsys.readouterr().out
    assert read_log(done) == read_log(straight)
    assert checkpoint.list_checkpoints(done) == [os.path.join(done, f"model_{s:05d}.pt")
                                                 for s in (N, 2 * N)]


def test_a_resume_from_an_older_checkpoint_needs_rewind(reference, tmp_path, capsys):
    shards, straight, _ = reference
    rewound = tmp_path / "rewound"
    shutil.copytree(straight, rewound)
    before = {name: (rewound / name).read_bytes() for name in os.listdir(rewound)}
    older = str(rewound / f"model_{N:05d}.pt")
    args = ["--resume", older, "--data-dir", shards]
    # the run's model_00012.pt and its log past step N would be replaced: refused
    assert run_cli(train_gpt2.main, args) == 1
    assert capsys.readouterr().err == (
        f"error: {rewound}/ holds this run's newer model_{2 * N:05d}.pt, which a resume from "
        f"step {N} would replace: --resume without a path continues the newest; --rewind goes "
        "back\n")
    assert {name: (rewound / name).read_bytes() for name in os.listdir(rewound)} == before
    # --rewind goes back, with the whole log kept aside first
    assert run_cli(train_gpt2.main, args + ["--rewind"]) == 0
    assert (f"--rewind: kept {rewound}/log.txt whole as {rewound}/log.1.txt; 1 newer "
            "checkpoint(s) of this run will be replaced") in capsys.readouterr().out
    assert (rewound / "log.1.txt").read_bytes() == before["log.txt"]
    assert [(s, k) for s, k, _ in read_log(str(rewound))] == [
        (s, k) for s, k, _ in read_log(straight)]
    with pytest.raises(SystemExit, match="2"):  # argparse's own status, one line
        train_gpt2.main(["--rewind"])
    assert "error: --rewind goes with --resume PATH" in capsys.readouterr().err


def test_keep_checkpoints(reference, tmp_path):
    shards, _, _ = reference
    log_dir = str(tmp_path / "keep")
    run(["train_gpt2.py"] + TINY + ["--max-steps", "6", "--checkpoint-every", "2",
                                    "--keep-checkpoints", "2", "--data-dir", shards,
                                    "--log-dir", log_dir])
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00004.pt", "model_00006.pt"]


def test_checkpoint_holds_plain_data(reference):
    _, straight, _ = reference
    ckpt = checkpoint.read_checkpoint(os.path.join(straight, f"model_{N:05d}.pt"))
    assert ckpt["step"] == N and isinstance(ckpt["config"], dict)
    assert ckpt["model_config"] == {"block_size": 32, "vocab_size": 512, "n_layer": 2,
                                    "n_head": 2, "n_embd": 32}
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert ckpt["train_loader"]["consumed"] == N * 8  # 8 micro batches per step
    model = train_gpt2.GPT.from_checkpoint(os.path.join(straight, f"model_{N:05d}.pt"))
    assert isinstance(model, train_gpt2.GPT)


class Exploit:
    # a pickle that calls os.system when it is loaded without weights_only
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_00001.pt"
    torch.save({"kind": checkpoint.CHECKPOINT_KIND, "model": Exploit(marker)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        train_gpt2.GPT.from_checkpoint(str(path))
    assert not marker.exists()
    # the same file through the command line: one line, no traceback, no code run
    out = run(["train_gpt2.py", "--sample", "--checkpoint", str(path)], check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert not marker.exists()


def test_foreign_and_truncated_checkpoints(reference, tmp_path):
    _, straight, _ = reference
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint of train_gpt2.py"):
        train_gpt2.GPT.from_checkpoint(str(foreign))
    good = open(os.path.join(straight, f"model_{N:05d}.pt"), "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[:len(good) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        train_gpt2.GPT.from_checkpoint(str(truncated))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(reference, tmp_path):
    shards, straight, _ = reference
    log_dir = tmp_path / "nan"
    log_dir.mkdir()
    # a checkpoint with a weight gone bad (--max-lr is at most 1, so no flag blows the
    # weights up any more): the first step's loss is nan
    ckpt = torch.load(os.path.join(straight, f"model_{N:05d}.pt"), weights_only=True)
    ckpt["model"]["transformer.h.0.ln_1.weight"][0] = float("nan")
    torch.save(ckpt, log_dir / f"model_{N:05d}.pt")
    out = run(["train_gpt2.py", "--log-dir", str(log_dir), "--resume"], check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "training diverged" in out.stderr and "at step" in out.stderr
    assert checkpoint.list_checkpoints(str(log_dir)) == [str(log_dir / f"model_{N:05d}.pt")]


def test_export_hf_matches_transformers(reference, tmp_path):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=2,
                                                n_head=2, n_embd=64)).eval()
    checkpoint.export_hf(model, str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "merges.txt", "model.safetensors",
                                                   "special_tokens_map.json",
                                                   "tokenizer_config.json", "vocab.json"]
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        ours = model(idx)[0][..., :50257]
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_export_hf_command(reference, tmp_path):
    _, straight, _ = reference
    ckpt = os.path.join(straight, f"model_{2 * N:05d}.pt")
    out_dir = str(tmp_path / "export")
    run(["train_gpt2.py", "--export-hf", out_dir, "--checkpoint", ckpt])
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    model = train_gpt2.GPT.from_checkpoint(ckpt)
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0][..., :512], hf(idx).logits[..., :512],
                                   atol=1e-5, rtol=0)


def test_a_flipped_bit_is_caught(reference, tmp_path):
    _, straight, _ = reference
    path = str(tmp_path / f"model_{N:05d}.pt")
    shutil.copy(os.path.join(straight, f"model_{N:05d}.pt"), path)
    flip_a_bit(path)
    # torch.load alone reads the damaged weight without a word
    damaged, good = weights(path), weights(os.path.join(straight, f"model_{N:05d}.pt"))
    assert not all(torch.equal(damaged[k], good[k]) for k in good)
    with pytest.raises(checkpoint.CheckpointError, match=f"{path} is corrupt"):
        train_gpt2.GPT.from_checkpoint(path)
    # a look at the plain data through mmap checks only the plain data's bytes
    assert checkpoint.read_checkpoint(path, mmap=True)["step"] == N
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint in"):
        checkpoint.read_newest_checkpoint(str(tmp_path))


def test_resume_passes_over_a_corrupt_newest_checkpoint(reference, tmp_path):
    shards, straight, _ = reference
    log_dir = str(tmp_path / "flipped")
    shutil.copytree(straight, log_dir)
    last = os.path.join(log_dir, f"model_{2 * N:05d}.pt")
    flip_a_bit(last)
    out = run(["train_gpt2.py"] + RUN + ["--data-dir", shards, "--log-dir", log_dir,
                                         "--resume"], env=env())
    assert f"warning: {last} is corrupt" in out.stdout
    assert f"resuming from {log_dir}/model_{N:05d}.pt at step {N}" in out.stdout
    # the run trained the lost steps again, and its new last checkpoint replaced the damaged one
    assert read_log(straight) == read_log(log_dir)
    wa, wb = weights(os.path.join(straight, f"model_{2 * N:05d}.pt")), weights(last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def resume_args(shards, log_dir, *more):
    return ["--resume", *more, "--log-dir", str(log_dir), "--data-dir", shards]


def test_checkpoints_past_step_99999(reference, tmp_path, capsys):
    # the reproduction: model_100000.pt sorts before model_99998.pt by name
    shards, straight, _ = reference
    log_dir = tmp_path / "long"
    log_dir.mkdir()
    ckpt = torch.load(os.path.join(straight, f"model_{N:05d}.pt"), weights_only=True)
    torch.save(dict(ckpt, step=99998), log_dir / "model_99998.pt")
    # the checkpoint's evaluation, then a line a killed run logged after it
    (log_dir / "log.txt").write_text("99997 train 4.5\n99998 val 4.25\n99998 train 4.0\n")
    more = ["--max-steps", "100003", "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    assert run_cli(train_gpt2.main, resume_args(shards, log_dir, *more)) == 0
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_100002.pt", "model_100003.pt"]
    log = [(step, stream) for step, stream, _ in read_log(log_dir)]
    assert log == ([(99997, "train"), (99998, "val")] +
                   [(s, "train") for s in range(99998, 100000)] + [(100000, "val")] +
                   [(s, "train") for s in range(100000, 100003)] + [(100003, "val")])
    # and --resume finds the newest one: the run is complete
    capsys.readouterr()
    assert run_cli(train_gpt2.main, resume_args(shards, log_dir, *more)) == 0
    assert "the run is complete: step 100003" in capsys.readouterr().out
    assert [(s, k) for s, k, _ in read_log(log_dir)] == log


def test_a_resume_never_touches_another_runs_files(reference, tmp_path, capsys):
    shards, straight, _ = reference
    # another run's log dir: its checkpoint, its log
    other = tmp_path / "other"
    other.mkdir()
    ckpt = torch.load(os.path.join(straight, f"model_{N:05d}.pt"), weights_only=True)
    torch.save(dict(ckpt, run_id="another run"), other / f"model_{2 * N:05d}.pt")
    (other / "log.txt").write_text("0 val 6.5\n0 train 6.25\n")
    before = {name: (other / name).read_bytes() for name in os.listdir(other)}
    ours = os.path.join(straight, f"model_{N:05d}.pt")
    assert run_cli(train_gpt2.main, ["--resume", ours, "--log-dir", str(other)]) == 1
    assert capsys.readouterr().err == (f"error: {other}/ holds the checkpoints of another run, "
                                       "which a resume must not mix with its own: resume into "
                                       "another --log-dir\n")
    assert {name: (other / name).read_bytes() for name in os.listdir(other)} == before
    # a log.txt with no checkpoint of this run beside it is another run's too: kept
    (other / f"model_{2 * N:05d}.pt").unlink()
    assert run_cli(train_gpt2.main, ["--resume", ours, "--log-dir", str(other),
                                     "--data-dir", shards]) == 0
    assert (f"kept the log.txt already in {other}/ as {other}/log.1.txt (no checkpoint of this "
            "run lies beside it)") in capsys.readouterr().out
    assert (other / "log.1.txt").read_bytes() == before["log.txt"]
    # the new log.txt starts at the checkpoint (in-process: not bitwise, the thread count
    # differs from the reference run's)
    assert [(s, k) for s, k, _ in read_log(str(other))] == [
        (s, k) for s, k, _ in read_log(straight) if s > N or (s == N and k == "train")]


def test_keep_checkpoints_counts_only_its_own_run(tmp_path):
    log_dir = str(tmp_path)
    state = {"model": {"w": torch.zeros(3)}, "config": {}}
    checkpoint.save_checkpoint(dict(state, run_id="theirs"), log_dir, 1)
    for step in (2, 3, 4):
        checkpoint.save_checkpoint(dict(state, run_id="ours"), log_dir, step, keep=2)
    assert sorted(os.listdir(log_dir)) == ["model_00001.pt", "model_00003.pt", "model_00004.pt"]
    # a checkpoint of this run at a later step (a resume of an older one) is not counted
    checkpoint.save_checkpoint(dict(state, run_id="ours"), log_dir, 2, keep=1)
    assert sorted(os.listdir(log_dir)) == ["model_00001.pt", "model_00002.pt", "model_00003.pt",
                                           "model_00004.pt"]


def test_a_checkpoint_without_run_id_is_its_directorys_run(reference, tmp_path):
    # checkpoints saved before run ids: a resume in their directory adopts them
    shards, straight, _ = reference
    log_dir = tmp_path / "old"
    shutil.copytree(straight, log_dir)
    for name in (f"model_{N:05d}.pt", f"model_{2 * N:05d}.pt"):
        ckpt = torch.load(log_dir / name, weights_only=True)
        del ckpt["run_id"]
        torch.save(ckpt, log_dir / name)
    assert run_cli(train_gpt2.main, resume_args(shards, log_dir, "--max-steps", str(3 * N),
                                                "--keep-checkpoints", "2")) == 0
    assert sorted(os.listdir(log_dir)) == ["log.txt", f"model_{2 * N:05d}.pt",
                                           f"model_{3 * N:05d}.pt"]
    new = checkpoint.read_checkpoint(str(log_dir / f"model_{3 * N:05d}.pt"))
    assert new["run_id"] == checkpoint.directory_run_id(str(log_dir / "model_00001.pt"))


def test_resume_with_malformed_log_lines(reference, tmp_path, capsys):
    shards, straight, _ = reference
    log_dir = tmp_path / "edited"
    shutil.copytree(straight, log_dir)
    (log_dir / f"model_{2 * N:05d}.pt").unlink()
    # a note a user added at the top, and the last line of a run killed while writing it
    original = (log_dir / "log.txt").read_text()
    (log_dir / "log.txt").write_text("# lr 3e-3, first try\n" + original + f"{N + 3} tra")
    assert run_cli(train_gpt2.main, resume_args(shards, log_dir)) == 0
    out = capsys.readouterr().out
    assert out.count("warning:") == 1
    assert (f"warning: {log_dir}/log.txt: 2 malformed line(s): kept 1 among the lines up to "
            f"step {N}, dropped 1 after them") in out
    text = (log_dir / "log.txt").read_text()
    assert text.startswith("# lr 3e-3, first try\n") and f"{N + 3} tra\n" not in text
    entries = [checkpoint.parse_log_line(line) for line in text.splitlines()[1:]]
    assert [e[:2] for e in entries] == [(s, k) for s, k, _ in read_log(straight)]


def test_ctrl_c_saves_and_resume_is_bitwise_identical(reference, tmp_path):
    shards, straight, _ = reference
    log_dir = str(tmp_path / "interrupted")
    args = ["train_gpt2.py"] + RUN + ["--data-dir", shards, "--log-dir", log_dir]
    proc = subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, os.path.join(log_dir, "log.txt"), "2 train")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "SIGINT: stopping after this step with a checkpoint" in err
    stopped = int(err.split("interrupted at step ")[1].split(":")[0])
    path = os.path.join(log_dir, f"model_{stopped:05d}.pt")
    assert err.strip().endswith(f"interrupted at step {stopped}: saved {path}; continue with "
                                "--resume")
    assert 3 <= stopped < 2 * N and checkpoint.read_checkpoint(path)["step"] == stopped
    # what a kill in the middle of a save leaves: its temp file, removed at the next start
    # (a file of the user's that merely looks alike stays)
    for name in (f".model_{stopped + 1:05d}.pt.12345.tmp", ".model_notes.tmp"):
        open(os.path.join(log_dir, name), "w").close()
    out = run(args + ["--resume"], env=env())
    assert f"resuming from {path} at step {stopped}" in out.stdout
    assert sorted(n for n in os.listdir(log_dir) if n.startswith(".")) == [".model_notes.tmp"]
    assert read_log(straight) == read_log(log_dir)
    last = f"model_{2 * N:05d}.pt"
    wa, wb = weights(os.path.join(straight, last)), weights(os.path.join(log_dir, last))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_second_ctrl_c_stops_at_once(shards, tmp_path, monkeypatch, capsys):
    # the first Ctrl-C after the train line of step 3, the second while its checkpoint is
    # being written
    real_log_step, real_save = train_gpt2.log_step, torch.save

    def log_step(run, step, *args):
        real_log_step(run, step, *args)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    def save(obj, f):
        if not obj["evaluated"]:  # the interrupt's checkpoint
            f.write(b"the first bytes of a checkpoint")
            os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, f)
    monkeypatch.setattr(train_gpt2, "log_step", log_step)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    log_dir = str(tmp_path / "twice")
    status = run_cli(train_gpt2.main, TINY + ["--max-steps", "8", "--checkpoint-every", "2",
                                              "--data-dir", shards, "--log-dir", log_dir])
    assert status == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")
    # the checkpoint under way is gone, temp file and all; the one before is whole
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00002.pt"]
    assert checkpoint.read_checkpoint(os.path.join(log_dir, "model_00002.pt"))["step"] == 2
