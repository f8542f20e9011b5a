"""DDP through torchrun on the CPU (gloo): two ranks with one micro step each train
exactly like one process with two micro steps, on one node and on two."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import EXAMPLES, ROOT, TINY, read_log, run, write_jsonl

STEPS = ["--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "3",
         "--batch-size", "4", "--total-batch-size", "256"]  # B*T = 128: 2 micro steps


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(extra, args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run"] + extra +
                            ["train_gpt2.py"] + args, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


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
