"""Mixed precision and devices: the device policy, --dtype (fp16 with a GradScaler on a
CPU), and --batch-size auto's probe with an injected CUDA out-of-memory error."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import config
import device
import train_gpt2
from common import UserError, run_cli
from conftest import ROOT, TINY, read_log, run, wait_for_line


def one_thread():
    # the same thread count in every run: float sums are then bitwise reproducible
    return dict(os.environ, OMP_NUM_THREADS="1")


# ----------------------------------------------------------------------------- policy

@pytest.mark.parametrize("where, expected", [
    (("cpu", False), ("fp32", False, True, False, "cpu", False)),
    (("cpu", True), ("bf16", False, True, False, "cpu", False)),
    (("cuda", True, (9, 0)), ("bf16", True, True, True, "cuda", False)),  # H100
    (("cuda", False, (7, 5)), ("fp16", True, True, True, "cuda", True)),  # T4
    (("cuda", False, (6, 1)), ("fp32", False, True, True, "cuda", False)),  # a GTX 1080
    (("mps", False), ("fp32", False, True, False, "mps", False)),
])
def test_device_policy(where, expected):
    policy = device.device_policy(*where)
    assert (policy.dtype, policy.compile, policy.fused_adamw, policy.pin_memory,
            policy.autocast_device, policy.grad_scaler) == expected


def test_device_policy_of_a_dtype_asked_for():
    assert device.device_policy("cpu", dtype="fp16").grad_scaler
    assert device.device_policy("mps", dtype="bf16").dtype == "bf16"
    assert not device.device_policy("cuda", False, (7, 0), dtype="fp32").grad_scaler
    with pytest.raises(UserError, match="--dtype bf16 or fp32"):
        device.device_policy("mps", dtype="fp16")


def test_bf16_flags_are_spellings_of_dtype():
    assert config.parse_config(["--bf16"])[0].dtype == "bf16"
    assert config.parse_config(["--no-bf16"])[0].dtype == "fp32"
    assert config.parse_config(["--dtype", "fp16"])[0].dtype == "fp16"
    assert config.parse_config([])[0].dtype == "auto"
    with pytest.raises(UserError, match="--bf16 means --dtype bf16, not --dtype fp16"):
        config.parse_config(["--bf16", "--dtype", "fp16"])
    # a checkpoint from before --dtype stored bf16 only; a resume may change the dtype
    saved = dict(vars(config.TrainConfig()), bf16=True)
    del saved["dtype"]
    assert config.resume_config(saved, {}, "old.pt").dtype == "bf16"
    assert config.resume_config(saved, {"dtype": "fp16"}, "old.pt").dtype == "fp16"


# ----------------------------------------------------------------------------- fp16

def test_fp16_loss_follows_fp32(shards, tmp_path, capsys):
    losses = {}
    for dtype in ("fp32", "fp16"):
        log_dir = str(tmp_path / dtype)
        assert run_cli(train_gpt2.main, TINY + ["--dtype", dtype, "--max-steps", "20",
                                                "--eval-every", "0", "--data-dir", shards,
                                                "--log-dir", log_dir]) == 0
        out = capsys.readouterr().out
        assert ("fp16 autocast with a GradScaler" in out) == (dtype == "fp16")
        losses[dtype] = [v for _, stream, v in read_log(log_dir) if stream == "train"]
    assert losses["fp16"] != losses["fp32"]  # autocast did run in fp16
    # fp16 keeps 11 bits of mantissa: at this shape each step's loss stays within 0.1% of
    # fp32's (about 100 times the largest difference seen)
    for a, b in zip(losses["fp16"], losses["fp32"]):
        assert abs(a - b) < 1e-3 * b
    assert losses["fp16"][-1] < losses["fp16"][0] - 0.5  # and it learns


def test_an_inf_gradient_is_skipped_and_the_scale_backs_off(shards, tmp_path, monkeypatch):
    forward, calls = train_gpt2.GPT.forward, []

    def forward_with_inf_gradient(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        calls.append(idx.shape)
        if len(calls) == 5:  # step 2, its first micro step: an overflow in backward
            logits.register_hook(lambda grad: grad * float("inf"))
        return logits, loss

    monkeypatch.setattr(train_gpt2.GPT, "forward", forward_with_inf_gradient)
    log_dir = tmp_path / "inf"
    assert run_cli(train_gpt2.main, TINY + [
        "--dtype", "fp16", "--max-steps", "5", "--eval-every", "0", "--checkpoint-every", "1",
        "--keep-checkpoints", "0", "--data-dir", shards, "--log-dir", str(log_dir)]) == 0
    log = {(step, stream): value for step, stream, value in read_log(str(log_dir))}
    assert [log[s, "scale"] for s in range(5)] == [65536, 65536, 32768, 32768, 32768]
    assert [log[s, "skipped"] for s in range(5)] == [0, 0, 1, 1, 1]
    # the skipped step (step 2: from 2 updates to 3) left the weights and AdamW as they were
    before, after = (torch.load(log_dir / f"model_{n:05d}.pt", weights_only=True)
                     for n in (2, 3))
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert before["optimizer"]["state"][0]["step"] == after["optimizer"]["state"][0]["step"]
    # the scale halved, and its count of steps without an overflow starts again
    assert after["scaler"] == dict(before["scaler"], scale=32768.0, _growth_tracker=0,
                                   skipped_steps=1)
    assert not torch.equal(before["model"]["lm_head.weight"],
                           torch.load(log_dir / "model_00004.pt",
                                      weights_only=True)["model"]["lm_head.weight"])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_an_inf_loss_stops_only_a_run_without_a_scaler(shards, tmp_path, monkeypatch, capsys,
                                                       dtype):
    forward, calls = train_gpt2.GPT.forward, []

    def forward_with_inf_loss(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        calls.append(idx.shape)
        return logits, loss * float("inf") if len(calls) == 5 else loss  # step 2

    monkeypatch.setattr(train_gpt2.GPT, "forward", forward_with_inf_loss)
    log_dir = tmp_path / dtype
    status = run_cli(train_gpt2.main, TINY + [
        "--dtype", dtype, "--max-steps", "4", "--eval-every", "0", "--checkpoint-every", "1",
        "--keep-checkpoints", "0", "--data-dir", shards, "--log-dir", str(log_dir)])
    log = {(step, stream): value for step, stream, value in read_log(str(log_dir))}
    if dtype == "fp16":  # the scaler skipped the step, and the run went on
        assert status == 0 and log[2, "train"] == float("inf") and log[3, "skipped"] == 1
    else:  # nothing to recover it: one line, and no checkpoint after the last good one
        assert status == 1
        assert "the loss is inf at step 2" in capsys.readouterr().err
        assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00001.pt", "model_00002.pt"]


def test_fp16_sigkill_then_resume_is_bitwise_identical(shards, tmp_path):
    args = TINY + ["--dtype", "fp16", "--max-steps", "10", "--checkpoint-every", "5",
                   "--keep-checkpoints", "0", "--data-dir", shards]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run(["train_gpt2.py"] + args + ["--log-dir", straight], env=one_thread())
    proc = subprocess.Popen([sys.executable, "train_gpt2.py"] + args + ["--log-dir", killed],
                            cwd=ROOT, env=one_thread(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_line(proc, os.path.join(killed, "log.txt"), "7 train")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run(["train_gpt2.py"] + args + ["--log-dir", killed, "--resume"], env=one_thread())
    assert "at step 5" in out.stdout
    assert read_log(straight) == read_log(killed)  # losses, scales, skipped: bitwise
    a, b = (torch.load(os.path.join(d, "model_00010.pt"), weights_only=True)
            for d in (straight, killed))
    assert a["scaler"]["scale"] == 65536.0 and a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ----------------------------------------------------------------------------- batch_fit

def fake_cuda_memory(monkeypatch):
    # the CUDA memory statistics the probe reads, on a machine without CUDA
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 19.5 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Props", (), {"total_memory": 24 * 2 ** 30}))


def tiny_build(largest_that_fits, tried):
    """build() for fit_micro_batch: a tiny GPT on the CPU whose forward raises CUDA's
    out-of-memory error above `largest_that_fits` rows."""
    def build():
        model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=32, vocab_size=512, n_layer=1,
                                                    n_head=2, n_embd=16))
        forward = model.forward

        def forward_or_oom(idx, targets=None):
            tried.append(idx.size(0))
            if idx.size(0) > largest_that_fits:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")
            return forward(idx, targets)
        model.forward = forward_or_oom
        return model, model.configure_optimizers(0.1, 1e-3, "cpu")
    return build


def test_batch_fit_halves_on_out_of_memory(monkeypatch):
    fake_cuda_memory(monkeypatch)
    tried = []
    B, line = device.fit_micro_batch(tiny_build(20, tried), 64, 32, 2 ** 14, "cuda")
    assert tried == [64, 32, 16] and B == 16
    assert line == "micro-batch 16 x 32 (auto, 19.5 of 24 GiB), 32 micro steps"
    with pytest.raises(UserError, match="micro-batch 1 x 32: even one row"):
        device.fit_micro_batch(tiny_build(0, []), 4, 32, 2 ** 14, "cuda")


def test_batch_fit_ranks_take_the_smallest(monkeypatch):
    fake_cuda_memory(monkeypatch)

    def all_reduce_with_a_rank_that_fit_8(tensor, op):
        assert op == torch.distributed.ReduceOp.MIN
        tensor.clamp_(max=8)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce_with_a_rank_that_fit_8)
    B, line = device.fit_micro_batch(tiny_build(64, []), 64, 32, 2 ** 14, "cuda",
                                     world_size=2)
    assert B == 8 and line == "micro-batch 8 x 32 (auto, another rank's), 32 micro steps"


def test_batch_fit_auto_on_a_cpu_keeps_the_preset_and_resumes(shards, tmp_path, capsys):
    args = TINY + ["--preset", "shakespeare", "--batch-size", "auto", "--max-steps", "2",
                   "--checkpoint-every", "2", "--data-dir", shards]
    log_dir = str(tmp_path / "auto")
    assert run_cli(train_gpt2.main, args + ["--log-dir", log_dir]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 4 x 32 (auto, the preset's on cpu), 2 micro steps" in out
    ckpt = torch.load(os.path.join(log_dir, "model_00002.pt"), weights_only=True)
    assert ckpt["config"]["batch_size"] == 4
    # a resume with auto reuses the checkpoint's micro-batch; another number is refused
    assert run_cli(train_gpt2.main, args + ["--log-dir", log_dir, "--resume",
                                            "--max-steps", "3"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert run_cli(train_gpt2.main, TINY + ["--preset", "shakespeare", "--batch-size", "8",
                                            "--resume", "--log-dir", log_dir]) == 1
    assert "trained with --batch-size 4" in capsys.readouterr().err


def test_batch_fit_fixed_batch_out_of_memory_is_one_line(shards, tmp_path, monkeypatch,
                                                          capsys):
    def out_of_memory(self, idx, targets=None, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    monkeypatch.setattr(train_gpt2.GPT, "forward", out_of_memory)
    assert run_cli(train_gpt2.main, TINY + ["--data-dir", shards, "--log-dir",
                                            str(tmp_path / "oom")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: CUDA out of memory at micro-batch 4 x 32: try --batch-size 2, or "
        "--batch-size auto"]


def test_batch_size_flag_reads_a_number_or_auto():
    assert config.parse_config(["--batch-size", "auto"])[0].batch_size == "auto"
    assert config.parse_config(["--batch-size", "8"])[0].batch_size == 8
    with pytest.raises(SystemExit):
        config.parse_config(["--batch-size", "many"])
