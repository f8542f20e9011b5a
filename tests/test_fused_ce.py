"""fused_ce.py against the plain PyTorch path it replaces. On a CPU the Triton kernel runs in
Triton's interpreter (TRITON_INTERPRET=1), which computes it with NumPy: the same program,
so these tests check its arithmetic, not its speed. On a CUDA machine (tests/gpu_check.sh)
the same tests run the compiled kernel."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# conftest.py chose Triton's interpreter where there is no GPU, before anything imported Triton
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton", reason="the kernel tests need Triton: pip install triton")

import fused_ce  # noqa: E402
from common import UserError  # noqa: E402
from config import TrainConfig, check_config  # noqa: E402
from train_gpt2 import GPT, GPTConfig  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def loss_and_grads(fn, x, w, scale=0.25, bf16=False):
    x.grad = w.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = fn(x, w)
    (loss * scale).backward()  # a non-unit upstream gradient, as grad accumulation gives
    return loss.detach(), x.grad.clone(), w.grad.clone()


def plain(x, w, targets):
    return F.cross_entropy(F.linear(x, w), targets)


def lm_head_inputs(seed, N, C, V, w_std):
    """x (N, C) as a layernorm's output, the lm_head's weight (V, C), targets (N,)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen).to(DEVICE).requires_grad_()
    w = (w_std * torch.randn(V, C, generator=gen)).to(DEVICE).requires_grad_()
    return x, w, torch.randint(V, (N,), generator=gen).to(DEVICE)


@pytest.mark.parametrize("chunk_rows", [16, 4096])
def test_fused_linear_cross_entropy_equals_plain_fp32(chunk_rows):
    # V above the kernel's 8,192-column block and not a multiple of it: two blocks, the
    # second masked; 50 rows in chunks of 16 leave a short last chunk
    x, w, targets = lm_head_inputs(0, N=50, C=24, V=9001, w_std=0.5)
    fused = loss_and_grads(
        lambda x, w: fused_ce.fused_linear_cross_entropy(x, w, targets, chunk_rows), x, w)
    ref = loss_and_grads(lambda x, w: plain(x, w, targets), x, w)
    for name, a, b in zip(("loss", "grad x", "grad w"), fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) < 1e-5, name


def test_fused_linear_cross_entropy_bf16_matches_the_plain_autocast_path():
    # Under autocast both paths round the logits and their gradient to bf16, so both sit
    # at bf16's distance from the exact (float64) values; the fused one may not be
    # further. The interpreter truncates where the GPU rounds to nearest (about twice
    # the error), hence the factor 3.
    x, w, targets = lm_head_inputs(1, N=64, C=48, V=1000, w_std=0.3)
    fused = loss_and_grads(
        lambda x, w: fused_ce.fused_linear_cross_entropy(x, w, targets, 24), x, w, bf16=True)
    autocast = loss_and_grads(lambda x, w: plain(x, w, targets), x, w, bf16=True)
    exact = loss_and_grads(lambda x, w: plain(x.double(), w.double(), targets), x, w)
    for name, a, b, e in zip(("loss", "grad x", "grad w"), fused, autocast, exact):
        assert a.dtype == b.dtype == torch.float32, name
        assert rel(a, e) < max(3 * rel(b, e), 1e-4), name
        assert rel(a, e) < 2e-2, name


def test_cross_entropy_rows_loss_and_gradient_in_place():
    gen = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(7, 300, generator=gen)).to(DEVICE)
    targets = torch.randint(300, (7,), generator=gen).to(DEVICE)
    expected_loss = F.cross_entropy(logits, targets, reduction="none")
    expected_grad = (torch.softmax(logits, -1) - F.one_hot(targets, 300)) / 7
    z = logits.clone()
    losses = fused_ce.cross_entropy_rows(z, targets)  # without a gradient, z is left alone
    assert torch.equal(z, logits) and torch.allclose(losses, expected_loss, atol=1e-5)
    fused_ce.cross_entropy_rows(z, targets, grad_scale=1 / 7)
    assert torch.allclose(z, expected_grad, atol=1e-6)


def tiny_models():
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config).to(DEVICE)
    fused = GPT(config, fused_ce=True).to(DEVICE)
    fused.load_state_dict(model.state_dict())
    return model, fused


def test_gpt_with_fused_ce_trains_as_the_plain_gpt():
    # the whole model: the tied wte/lm_head matrix gets both of its gradients
    model, fused = tiny_models()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randint(300, (2, 4, 16), generator=gen).to(DEVICE)
    losses = []
    for m in (model, fused):
        logits, loss = m(x, y)
        (loss / 4).backward()
        losses.append(loss.item())
    assert logits is None  # the fused path returns only the loss
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert rel(q.grad, p.grad) < 1e-5, name


def test_gpt_with_fused_ce_keeps_the_logits_api():
    # HellaSwag, sampling and export call the model without targets: logits as before
    model, fused = tiny_models()
    idx = torch.randint(300, (3, 16), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        (a, _), (b, _) = model(idx), fused(idx)
        assert torch.equal(a, b)
        # and the val loss, with targets but no gradient
        assert fused(idx, idx)[1].item() == pytest.approx(model(idx, idx)[1].item(), rel=1e-6)


def test_gpt_with_fused_ce_under_torch_compile():
    # dynamo stops its graph at the fused function (torch.compiler.disable) and runs it
    # as written; the "eager" backend keeps the test fast on a CPU
    model, fused = tiny_models()
    x, y = torch.randint(300, (2, 4, 16), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    # dynamo stops at the fused loss, by name, rather than tracing into its kernel
    reasons = [b.reason for b in torch._dynamo.explain(fused)(x, y).break_reasons]
    assert [r for r in reasons if "fused_linear_cross_entropy" in r] == reasons != []
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="eager")
    _, loss = compiled(x, y)
    loss.backward()
    _, ref = model(x, y)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert rel(fused.lm_head.weight.grad, model.lm_head.weight.grad) < 1e-5


def test_fused_ce_flag_is_refused_off_cuda():
    cfg = dataclasses.replace(TrainConfig(), fused_ce=True)
    with pytest.raises(UserError, match="--fused-ce runs a Triton kernel on a CUDA GPU"):
        check_config(cfg, 1, "cpu")
    check_config(cfg, 1, "cuda")


def test_bench_fused_ce_runs_every_launch_and_agrees():
    # the benchmark that tests/gpu_check.sh runs, at a tiny shape: each way ran, and each
    # gives the plain path's loss and gradients
    import bench
    launches = [(64, (256, 4)), (24, (128, 2))]
    rows = list(bench.bench_fused_ce(DEVICE, rows=64, n_embd=16, vocab=300, launches=launches,
                                     compile_plain=False, steps=1, warmup=0))
    assert [r["way"] for r in rows] == ["F.cross_entropy"] + [
        "fused, 64 rows/chunk, block 256, 4 warps", "fused, 24 rows/chunk, block 128, 2 warps"]
    for r in rows:
        assert "failed" not in r and r["ms"] > 0
        assert max(r["dist_loss"], r["dist_grad_x"], r["dist_grad_w"]) < 2e-2, r
    alone = list(bench.bench_cross_entropy_alone(DEVICE, rows=64, vocab=300, launches=launches,
                                                 compile_plain=False, steps=1, warmup=0))
    assert [r["way"] for r in alone] == ["F.cross_entropy", "kernel, block 256, 4 warps",
                                         "kernel, block 128, 2 warps"]
    assert all("failed" not in r and r["ms"] > 0 and r["tb_s"] > 0 for r in alone)


def test_ladder_rung_takes_the_fused_path():
    import bench
    # GPT-2's 50,257 columns through the interpreter: few rows keep it quick
    shape = bench.Shape(n_layer=1, n_head=2, n_embd=32, batch_size=1, seq_len=16)
    plain = bench.Settings(flash=True)
    a = bench.time_training(plain, shape, DEVICE, steps=2, warmup=0)
    b = bench.time_training(dataclasses.replace(plain, fused_ce=True), shape, DEVICE, steps=2,
                            warmup=0)
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)  # same weights, same batch


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the profile groups kernels by name, "
                    "and the fused kernel is a cross-entropy kernel too")
def test_profile_takes_the_fused_path():
    # on a CPU the cross-entropy group is aten's log_softmax and nll_loss: gone when fused
    import bench
    shape = bench.Shape(n_layer=1, n_head=2, n_embd=32, batch_size=1, seq_len=16)
    groups = {fused_ce: {g for g, _, _ in bench.profile_step(shape, "cpu", 1, 1,
                                                             fused_ce=fused_ce)[0]}
              for fused_ce in (False, True)}
    assert "cross-entropy" in groups[False] and "cross-entropy" not in groups[True]


# Triton's compiler, without the interpreter, in a process of its own: the kernel for an H100
# as the JIT specializes it for the gpt2 preset (16-byte aligned pointers, stride and columns
# 50,304, divisible by 16), with Triton's own ptxas
COMPILE_FOR_H100 = """
import sys, triton, fused_ce
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
signature = {"logits_ptr": "*bf16", "stride": "i32", "targets_ptr": "*i64",
             "losses_ptr": "*fp32", "n_cols": "i32", "grad_scale": "fp32",
             "WRITE_GRAD": "constexpr", "BLOCK": "constexpr"}
aligned = {(i,): [["tt.divisibility", 16]] for i in range(5)}
block, num_warps = fused_ce.LAUNCH
source = ASTSource(fused_ce._cross_entropy_kernel(), signature,
                   {"WRITE_GRAD": True, "BLOCK": block}, aligned)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})
open(sys.argv[1], "wb").write(compiled.asm["cubin"])
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the tests above run the compiled kernel")
def test_the_kernel_compiles_for_an_h100_with_16_byte_accesses(tmp_path):
    # The interpreter runs the kernel's arithmetic, not Triton's compiler: compile it, then
    # read the machine code: one 16-byte load per thread and block in each pass, 16-byte
    # stores, no registers spilled to local memory
    import re
    import subprocess
    from conftest import run
    cubin = str(tmp_path / "cross_entropy_rows.cubin")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run(["-c", COMPILE_FOR_H100, cubin], env=env)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    usage, sass = (subprocess.run([cuobjdump, what, cubin], capture_output=True, text=True,
                                  check=True).stdout
                   for what in ("--dump-resource-usage", "--dump-sass"))
    assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage
    assert re.findall(r"LDG\.E\.128", sass) == ["LDG.E.128"] * 2, sass  # the logits, per pass
    assert re.findall(r"STG\.E\.(\w+)", sass) == ["128"], sass  # the gradient
