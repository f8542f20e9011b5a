"""The training script end to end on the CPU: the embedded default, the one-line errors,
the learning-rate schedule, and importing without side effects."""
import os

import pytest
import torch

import config
import train_gpt2
from common import run_cli
from conftest import EXAMPLES, ROOT, TINY, read_log, run, write_jsonl


def test_import_has_no_side_effects(tmp_path):
    # a fresh interpreter in an empty directory, sockets refused: importing creates no
    # file, starts no process group and touches no network
    code = ("import socket\n"
            "def refuse(*a, **k): raise OSError('network blocked by the test')\n"
            "socket.socket.connect = refuse\n"
            "import train_gpt2, torch.distributed as dist\n"
            "assert not dist.is_initialized()\n"
            "print('imported')\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = run(["-c", code], cwd=str(tmp_path), env=env)
    assert out.stdout.strip() == "imported"
    assert os.listdir(tmp_path) == []


def thp_available():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:  # not Linux, or a kernel without THP
        return False


@pytest.mark.skipif(not thp_available(), reason="needs Linux transparent huge pages")
def test_huge_pages_stop_page_faults_on_big_tensors():
    # A 64 MB tensor made and freed 8 times: each time the memory comes fresh from the
    # kernel, and writing it faults every page in: 16k faults of 4 KB pages, or 32 of 2 MB.
    code = ("import resource, sys, device\n"
            "if sys.argv[1] == 'huge': device.use_huge_pages()\n"
            "import torch\n"
            "torch.ones(2 ** 24)\n"  # the first one maps the allocator in
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(8): torch.ones(2 ** 24)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = ROOT
    faults = {way: int(run(["-c", code, way], env=env).stdout) for way in ("default", "huge")}
    assert faults["default"] > 8 * 2 ** 26 // 4096 // 2, faults  # 4 KB pages, faulted in
    assert faults["huge"] < faults["default"] / 10, faults


def test_lr_schedule():
    lr = [train_gpt2.get_lr(s, 6e-4, 6e-5, 10, 100) for s in range(120)]
    assert lr[0] == pytest.approx(6e-5) and lr[9] == pytest.approx(6e-4)
    assert all(a >= b for a, b in zip(lr[9:100], lr[10:101]))  # cosine decays
    assert lr[55] == pytest.approx((6e-4 + 6e-5) / 2)  # half way down at mid-decay
    assert lr[100] == lr[119] == pytest.approx(6e-5)


def test_presets_are_consistent():
    # every preset fills a valid config whose batch divides into micro batches on one rank
    for name in config.PRESETS:
        cfg, _ = config.parse_config(["--preset", name])
        assert cfg.n_embd % cfg.n_head == 0
        assert cfg.seq_len <= cfg.block_size
        assert cfg.total_batch_size % (cfg.batch_size * cfg.seq_len) == 0, name
    cfg, _ = config.parse_config([])
    assert (cfg.total_batch_size, cfg.batch_size, cfg.seq_len, cfg.max_steps,
            cfg.warmup_steps, cfg.max_lr, cfg.vocab_size) == \
        (2 ** 19, 64, 1024, 19073, 715, 6e-4, 50304)
    # a flag overrides its preset
    cfg, _ = config.parse_config(["--preset", "shakespeare", "--max-steps", "3"])
    assert cfg.max_steps == 3 and cfg.n_layer == 4


def test_shakespeare_preset_end_to_end(tmp_path):
    # the README's first command, shortened: tokenize input.txt, train, evaluate, sample,
    # log and checkpoint, on the same code path as GPT-2
    log_dir = str(tmp_path / "log")
    out = run(["train_gpt2.py", "--preset", "shakespeare", "--max-steps", "12",
               "--eval-every", "6", "--sample-every", "12", "--log-dir", log_dir])
    log = read_log(log_dir)
    assert [s for s, stream, _ in log if stream == "train"] == list(range(12))
    val = [v for _, stream, v in log if stream == "val"]
    assert [s for s, stream, _ in log if stream == "val"] == [0, 6, 12]
    assert val[-1] < val[0] - 0.5  # it learned something
    assert os.path.exists(os.path.join(log_dir, "model_00012.pt"))
    assert "sample 3: Hello, I'm a language model," in out.stdout
    assert f"val loss: {val[0]:.4f} at the first evaluation, {val[-1]:.4f} at the end" in out.stdout
    assert "tok/s" in out.stdout


BAD_INPUT = [
    (["--preset", "gpt3"], "invalid choice"),
    (["--total-batch-size", "1000", "--data-dir", "{shards}"], "not divisible by B*T*world_size"),
    (["--seq-len", "64", "--data-dir", "{shards}"], "longer than the model's block size"),
    (["--data-dir", "{tmp}/nowhere"], "`python fineweb.py --input FILE... --out-dir"),
    (["--device", "tpu", "--data-dir", "{shards}"], "unknown device"),
    (["--device", "cuda", "--data-dir", "{shards}"], "no CUDA"),
    (["--resume", "--data-dir", "{shards}", "--log-dir", "{tmp}/empty"], "no checkpoint in"),
    (["--sample"], "--sample needs --checkpoint"),
    (["--sample", "--checkpoint", "{tmp}/missing.pt"], "no checkpoint at"),
    (["--plot", "{tmp}/empty"], "no log.txt"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_user_errors_are_one_line(tmp_path, shards, capsys, args, message):
    if "--device" in args and "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [a.format(shards=shards, tmp=tmp_path) for a in args]
    base = TINY + ["--log-dir", str(tmp_path / "log")]
    try:
        status = run_cli(train_gpt2.main, base + args)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert len(err) <= 2  # argparse adds its usage line; ours is one line


def test_missing_fineweb_shards_is_one_line_without_traceback(tmp_path):
    # the plain `python train_gpt2.py` on a fresh clone
    out = run([os.path.join(ROOT, "train_gpt2.py"), "--device", "cpu"], cwd=str(tmp_path),
              check=False)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "python fineweb.py" in out.stderr and "--preset shakespeare" in out.stderr


def test_hellaswag_in_the_loop_with_compile(tmp_path, shards):
    # torch.compile on (inductor builds C++ kernels on the CPU); HellaSwag runs on the
    # uncompiled module, so its varying shapes never recompile the training graph
    jsonl = str(tmp_path / "hella.jsonl")
    write_jsonl(jsonl, EXAMPLES)
    log_dir = str(tmp_path / "log")
    env = dict(os.environ, TORCH_LOGS="recompiles")
    args = TINY + ["--compile", "--vocab-size", "50304", "--max-steps", "4", "--eval-every", "2",
                   "--hellaswag-every", "2", "--hellaswag-jsonl", jsonl, "--data-dir", shards,
                   "--log-dir", log_dir]
    out = run(["train_gpt2.py"] + args, env=env)
    hella = [(s, v) for s, stream, v in read_log(log_dir) if stream == "hella"]
    assert [s for s, _ in hella] == [0, 2, 4]
    assert all(0 <= v <= 1 for _, v in hella)
    assert f"({len(EXAMPLES)} examples)" in out.stdout
    # at most the one recompile for model.eval() in the val loss; none per example
    assert (out.stdout + out.stderr).count("Recompiling") <= 1


# The run that wrote tests/data/checkpoint_1b9a2e4.pt with the code of commit 1b9a2e4 (before
# the one-script restructure), step 2 of 4, on write_token_shards' default data:
OLD_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32",
           "--vocab-size", "512", "--batch-size", "4", "--seq-len", "32",
           "--total-batch-size", "256", "--warmup-steps", "2", "--max-lr", "3e-3",
           "--eval-every", "2", "--val-tokens", "512", "--sample-every", "0",
           "--hellaswag-every", "0", "--device", "cpu", "--no-compile", "--no-bf16",
           "--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "0"]


def test_a_checkpoint_of_the_old_code_resumes(tmp_path, shards):
    # resumed with today's code, it ends where today's code ends without a stop: the
    # checkpoint format and the training arithmetic are what they were
    import shutil
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(os.path.join(ROOT, "tests", "data", "checkpoint_1b9a2e4.pt"),
                resumed / "model_00002.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = run(["train_gpt2.py", "--resume", "--data-dir", shards, "--log-dir", str(resumed)],
              env=env)
    assert "resuming from" in out.stdout and "at step 2" in out.stdout
    straight = str(tmp_path / "straight")
    run(["train_gpt2.py"] + OLD_RUN + ["--data-dir", shards, "--log-dir", straight], env=env)
    a = torch.load(os.path.join(straight, "model_00004.pt"), weights_only=True)
    b = torch.load(resumed / "model_00004.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=0)
    # the evaluations of step 2 ran before that checkpoint was saved, in the old run's log
    assert [e for e in read_log(straight) if e[0] > 2 or e[0] == 2 and e[1] == "train"] == \
        read_log(str(resumed))


def test_the_recompile_counter_sees_a_recompile():
    # the positive control of test_hellaswag_in_the_loop_with_compile: with the same
    # TORCH_LOGS, a compiled function called with a new shape does print "Recompiling"
    code = ("import torch\n"
            "f = torch.compile(lambda x: x * 2, backend='eager', dynamic=False)\n"
            "f(torch.ones(2)); f(torch.ones(3))\n")
    out = run(["-c", code], env=dict(os.environ, TORCH_LOGS="recompiles"))
    assert (out.stdout + out.stderr).count("Recompiling") >= 1
