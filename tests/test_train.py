"""The training script end to end on the CPU: the embedded default, the ranges of its flags,
the learning-rate schedule, and importing without side effects."""
import dataclasses
import os

import pytest
import torch

import config
import train_gpt2
from common import UserError, run_cli
from conftest import EXAMPLES, NO_NETWORK, OLD_RUN, ROOT, TINY, read_log, run, write_jsonl


def test_import_has_no_side_effects(tmp_path):
    # a fresh interpreter in an empty directory, sockets refused: importing creates no
    # file, starts no process group and touches no network
    code = (NO_NETWORK +
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


def test_a_resumed_run_is_checked_too():
    # a checkpoint keeps its values; they must still be in range when a run continues it
    saved = dict(dataclasses.asdict(config.parse_config(TINY)[0]), grad_clip=-1.0)
    with pytest.raises(UserError, match=r"^--grad-clip -1 is out of range: use 0 \(no "
                                        r"clipping\) or above 0 \(default 1\)$"):
        config.resume_config(saved, {}, "model_00010.pt")


def test_batch_size_auto_is_checked_before_its_probe_builds_a_model():
    # on CUDA, --batch-size auto builds models to probe memory: the model's shape is
    # refused first, in one line, and the micro-batch once the probe has chosen it
    cfg, _ = config.parse_config(TINY + ["--batch-size", "auto", "--n-head", "3"])
    with pytest.raises(UserError, match="^--n-embd 32 is not divisible by --n-head 3$"):
        config.check_config(cfg)
    cfg = dataclasses.replace(cfg, n_head=2, total_batch_size=1000)
    config.check_config(cfg)  # the total batch waits for the chosen micro-batch
    with pytest.raises(UserError, match="^--total-batch-size 1000 is not divisible by B"):
        config.check_batch(dataclasses.replace(cfg, batch_size=2))


def test_valid_but_suspicious_configurations_warn_and_run(capsys):
    cfg, _ = config.parse_config(["--preset", "shakespeare", "--max-steps", "20"])
    config.check_config(cfg)
    assert capsys.readouterr().out.splitlines() == [
        "warning: --warmup-steps 20 is not below --max-steps 20: the run ends before the "
        "learning rate reaches --max-lr",
        "warning: --eval-every 100 is longer than the run (--max-steps 20): validation runs "
        "only at the start and the end",
        "warning: --sample-every 200 is longer than the run (--max-steps 20): samples are "
        "printed only at the end",
        "warning: --checkpoint-every 200 is longer than the run (--max-steps 20): the only "
        "checkpoint is the last"]
    for preset in config.PRESETS:  # the recipes as they are warn of nothing
        config.check_config(config.parse_config(["--preset", preset])[0])
    assert capsys.readouterr().out == ""
    # a val split smaller than --val-tokens: each evaluation reads what there is
    cfg, _ = config.parse_config(TINY)  # 1024 val tokens in windows of 4 x 32: 8 windows
    assert config.val_windows(cfg, 20) == 8 and capsys.readouterr().out == ""
    assert config.val_windows(cfg, 3) == 3
    assert capsys.readouterr().out == ("warning: the val split holds 384 tokens in windows of "
                                       "4 x 32, fewer than --val-tokens 1,024: each evaluation "
                                       "reads all of them\n")


def test_grad_clip_0_is_no_clipping(tmp_path, shards):
    # 0 is "off" because --help says so: the same weights as a bound no norm ever reaches
    weights = []
    for clip in ("0", "1e30"):
        log_dir = str(tmp_path / clip)
        assert run_cli(train_gpt2.main, TINY + ["--max-steps", "3",
                                                "--grad-clip", clip, "--data-dir", shards,
                                                "--log-dir", log_dir]) == 0
        weights.append(torch.load(os.path.join(log_dir, "model_00003.pt"),
                                  weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


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
    # one layer: Inductor builds 25 kernels with g++ instead of 31 for two, which is most of
    # this test's time on a machine whose cache is empty
    args = TINY + ["--compile", "--n-layer", "1", "--vocab-size", "50304", "--max-steps", "4",
                   "--eval-every", "2", "--hellaswag-every", "2", "--hellaswag-jsonl", jsonl,
                   "--data-dir", shards, "--log-dir", log_dir]
    out = run(["train_gpt2.py"] + args, env=env)
    hella = [(s, v) for s, stream, v in read_log(log_dir) if stream == "hella"]
    assert [s for s, _ in hella] == [0, 2, 4]
    assert all(0 <= v <= 1 for _, v in hella)
    assert f"({len(EXAMPLES)} examples)" in out.stdout
    # at most the one recompile for model.eval() in the val loss; none per example
    assert (out.stdout + out.stderr).count("Recompiling") <= 1


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
