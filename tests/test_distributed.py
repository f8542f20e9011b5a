"""DDP through torchrun on the CPU (gloo): two ranks with one micro step each train
exactly like one process with two micro steps, on one node and on two; Ctrl-C and SIGTERM
save a checkpoint that resumes bit for bit."""
import os
import signal
import socket
import subprocess

import pytest
import torch

import checkpoint
from conftest import EXAMPLES, TINY, read_log, run, torchrun, wait_for_line, write_jsonl

STEPS = ["--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "3",
         "--batch-size", "4", "--total-batch-size", "256"]  # B*T = 128: 2 micro steps


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(log_dir):
    ckpt = torch.load(os.path.join(log_dir, "model_00006.pt"), weights_only=True)
    return ckpt["model"]


def assert_same_run(single, multi):
    a, b = read_log(single), read_log(multi)
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6)
    wa, wb = final_weights(single), final_weights(multi)
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    from conftest import write_token_shards
    tmp = tmp_path_factory.mktemp("ddp")
    shards = write_token_shards(str(tmp / "shards"))
    log_dir = str(tmp / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run(["train_gpt2.py"] + TINY + STEPS + ["--data-dir", shards, "--log-dir", log_dir], env=env)
    return shards, log_dir, tmp


def test_two_ranks_equal_gradient_accumulation(single_run):
    shards, single, tmp = single_run
    multi = str(tmp / "standalone")
    p = torchrun(["--standalone", "--nproc_per_node=2"],
                 TINY + STEPS + ["--data-dir", shards, "--log-dir", multi])
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    assert "2 ranks x 1 micro steps" in out
    assert out.count("| val loss") == 3  # rank 0 alone prints
    assert_same_run(single, multi)


def test_two_nodes_with_c10d_rendezvous(single_run):
    shards, single, tmp = single_run
    multi = str(tmp / "two_nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun(["--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
                       "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                       "--rdzv_id=test", "--master_addr=127.0.0.1"],
                      TINY + STEPS + ["--data-dir", shards, "--log-dir", multi])
             for r in range(2)]
    try:
        outs = [n.communicate(timeout=240)[0] for n in nodes]
    except subprocess.TimeoutExpired:  # show both nodes' output, not just the timeout
        for n in nodes:
            n.kill()
        pytest.fail("two-node run timed out:\n" + "\n-----\n".join(
            n.communicate()[0][-3000:] for n in nodes))
    assert [n.returncode for n in nodes] == [0, 0], outs
    assert_same_run(single, multi)


def test_hellaswag_is_split_across_ranks(single_run):
    # each rank scores a stride of the examples; the all-reduced counts equal one process's
    shards, _, tmp = single_run
    jsonl = str(tmp / "hella.jsonl")
    write_jsonl(jsonl, EXAMPLES)
    args = TINY + ["--vocab-size", "50304", "--max-steps", "1", "--eval-every", "0",
                   "--hellaswag-every", "1", "--hellaswag-jsonl", jsonl, "--data-dir", shards]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run(["train_gpt2.py"] + args + ["--log-dir", str(tmp / "hella1")], env=env)
    p = torchrun(["--standalone", "--nproc_per_node=2"], args + ["--log-dir", str(tmp / "hella2")])
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    assert f"({len(EXAMPLES)} examples)" in out
    one = [v for _, k, v in read_log(str(tmp / "hella1")) if k == "hella"]
    two = [v for _, k, v in read_log(str(tmp / "hella2")) if k == "hella"]
    assert len(one) == 2 and one == two


# 8 micro steps per rank: steps long enough that a signal lands well before the end
LONG = TINY + ["--max-steps", "12", "--eval-every", "4", "--checkpoint-every", "6",
               "--keep-checkpoints", "0", "--total-batch-size", "2048"]


def interrupted_at(proc, log_dir, sig):
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert out.count(f"{sig.name}: stopping after this step") == 1, out  # rank 0 alone
    line = next(ln for ln in out.splitlines() if ln.startswith("interrupted at step "))
    step = int(line.split()[3].rstrip(":"))
    assert line == (f"interrupted at step {step}: saved {log_dir}/model_{step:05d}.pt; "
                    "continue with --resume")
    return step


def test_interrupts_under_torchrun_then_resume_is_bitwise_identical(single_run):
    shards, _, tmp = single_run
    straight, log_dir = str(tmp / "straight2"), str(tmp / "interrupted2")
    ranks = ["--standalone", "--nproc_per_node=2"]
    # the uninterrupted run alongside the interrupted ones
    reference = torchrun(ranks, LONG + ["--data-dir", shards, "--log-dir", straight])
    # Ctrl-C in a terminal: SIGINT to the foreground process group. The workers run in
    # sessions of their own, so torchrun alone gets it, and passes it on to each of them.
    args = LONG + ["--data-dir", shards, "--log-dir", log_dir]
    p = torchrun(ranks, args, new_session=True)
    wait_for_line(p, os.path.join(log_dir, "log.txt"), "2 train")
    os.killpg(p.pid, signal.SIGINT)
    first = interrupted_at(p, log_dir, signal.SIGINT)
    # SIGTERM to torchrun alone, as a scheduler preempting the job sends it
    p = torchrun(ranks, args + ["--resume"])
    wait_for_line(p, os.path.join(log_dir, "log.txt"), f"{first + 2} train")
    p.send_signal(signal.SIGTERM)
    second = interrupted_at(p, log_dir, signal.SIGTERM)
    assert 3 <= first < second < 12
    p = torchrun(ranks, args + ["--resume"])
    outs = []
    for proc in (p, reference):
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
        outs.append(out)
    assert outs[0].count("resuming from ") == 1, outs[0]  # every rank reads; one says so
    assert read_log(straight) == read_log(log_dir)
    a = torch.load(os.path.join(straight, "model_00012.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(log_dir, "model_00012.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_user_error_under_torchrun_is_printed_once(single_run):
    shards, _, tmp = single_run
    p = torchrun(["--standalone", "--nproc_per_node=2"],
                 TINY + ["--total-batch-size", "1000", "--data-dir", shards,
                         "--log-dir", str(tmp / "bad")])
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1
    # rank 0's line, once; then torchrun's own report of the ranks' exit codes, which no
    # exit status but 0 avoids
    assert out.count("error: --total-batch-size 1000 is not divisible by B*T*world_size "
                     "= 4*32*2 = 256") == 1, out
    assert "train_gpt2.py\", line" not in out, out  # no traceback from the script itself
    assert "ChildFailedError" in out


def descendants(pid):
    """The process ids under pid, from /proc."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                found += [child] + descendants(child)
    return found


def test_a_lost_rank_is_one_line_with_the_resume_command(single_run):
    shards, _, tmp = single_run
    log_dir = str(tmp / "lost")
    p = torchrun(["--standalone", "--nproc_per_node=2"],
                 TINY + ["--max-steps", "100000", "--checkpoint-every", "2", "--eval-every",
                         "0", "--data-dir", shards, "--log-dir", log_dir])
    wait_for_line(p, os.path.join(log_dir, "log.txt"), "3 train")
    rank1 = []
    for pid in descendants(p.pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            rank1 += [pid] if b"RANK=1" in f.read().split(b"\0") else []
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0, out
    ours = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(ours) == 1 and "train_gpt2.py\", line" not in out, out
    step, cause = int(ours[0].split()[7]), ours[0].split("(")[1].split(")")[0]
    assert cause in checkpoint.PEER_LOST, out  # gloo: "Connection closed by peer", or "reset"
    newest = checkpoint.list_checkpoints(log_dir)[-1]
    # intact, and at most one --checkpoint-every behind (the loss may come between the
    # log line of a step and the checkpoint after it)
    assert step - 2 <= checkpoint.read_checkpoint(newest)["step"] <= step, out
    assert ours[0] == (
        f"error: a rank was lost at step {step} ({cause}); the newest intact "
        f"checkpoint is {newest}: continue with `torchrun --standalone --nproc_per_node=2 "
        f"train_gpt2.py {' '.join(TINY)} --max-steps 100000 --checkpoint-every 2 --eval-every "
        f"0 --data-dir {shards} --log-dir {log_dir} --resume`"), out
