"""
Benchmarks: the lecture's speed-up ladder, and the CPU hot paths against their plain
alternatives.

    python bench.py ladder                     # GPT-2 (124M), B=16, T=1024 on a GPU
    python bench.py ladder --device cpu        # a small GPT on the CPU, about a minute
    python bench.py ladder --steps 50 --json ladder.json
    python bench.py cpu                        # every CPU benchmark, PASS/FAIL per target
    python bench.py cpu --only kvcache         # one of: tokenize loader hellaswag kvcache train
    python bench.py profile                    # where a GPT-2 training step's GPU time goes
    python bench.py fused-ce                   # lm_head + cross-entropy: compiled vs fused_ce.py

`ladder` trains for --steps steps per rung (after --warmup untimed ones) and each rung
adds one optimisation to the rungs before it, in the lecture's order. Its A100 figures
(build-nanogpt, B=16, T=1024, ms/step): fp32 1000, TF32 333, bf16 300, torch.compile 130,
flash attention 96, vocab 50304 93, fused AdamW 90 (~182k tokens/s, ~50% MFU). llm.c
reports ~468k tokens/s per H100 on 8xH100 (~40% MFU) and ~56% MFU on 8xA100. Rungs that
mean nothing on the device are listed as skipped: TF32 off CUDA, bf16 where the hardware
has no bf16 (a CPU without AVX512-BF16 or AMX), and huge pages, this project's rung for
CPUs, on a GPU.

`cpu` measures each hot path as a ratio against its plain alternative timed in the same
run, so a busy machine moves both sides alike; only the ratios are compared to targets.
On a CPU shared with other work, torch's threads wait for each other at every op when one
of them is descheduled; OMP_NUM_THREADS=1 gives slower but steadier figures.
"""

import contextlib
import dataclasses
import gc
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import fineweb
import hellaswag
import fused_ce
from common import ArgumentParser, UserError, run_cli
from device import autocast, bf16_native, peak_flops, resolve_device, use_huge_pages
from tokenizer import GPT2_VOCAB, get_encoding
from train_gpt2 import GPT, CausalSelfAttention, DataLoaderLite, GPTConfig, flops_per_token

HERE = os.path.dirname(os.path.abspath(__file__))
INPUT_TXT = os.path.join(HERE, "input.txt")
PADDED_VOCAB = 50304  # 50257 rounded up to a multiple of 128

# -----------------------------------------------------------------------------
# The ladder's rungs. A rung switches on one field of Settings, on top of every rung
# above it that ran.


@dataclass(frozen=True)
class Settings:
    tf32: bool = False        # fp32 matmuls on tensor cores, 10-bit mantissa
    bf16: bool = False        # autocast the forward to bfloat16
    compile: bool = False     # torch.compile the model
    flash: bool = False       # SDPA (flash attention) instead of the explicit softmax
    vocab_50304: bool = False  # pad the vocabulary to a "nice" number
    fused_adamw: bool = False  # one kernel for the whole optimizer step
    huge_pages: bool = False  # 2 MB pages for big CPU tensors (train_gpt2.py on a CPU)
    cd_tuning: bool = False   # inductor tunes each Triton kernel's launch configuration
    fused_ce: bool = False    # lm_head + cross-entropy through fused_ce.py (--fused-ce)


@dataclass(frozen=True)
class Rung:
    name: str
    turns_on: str = None  # a field of Settings; None for the baseline
    cuda_only: bool = False
    cpu_only: bool = False
    lecture_ms: float = None  # build-nanogpt's A100 ms/step at B=16, T=1024


RUNGS = [
    Rung("fp32", lecture_ms=1000),
    Rung("TF32", "tf32", cuda_only=True, lecture_ms=333),
    Rung("bf16 autocast", "bf16", lecture_ms=300),
    Rung("torch.compile", "compile", lecture_ms=130),
    Rung("flash attention", "flash", lecture_ms=96),
    Rung("vocab 50304", "vocab_50304", lecture_ms=93),
    Rung("fused AdamW", "fused_adamw", lecture_ms=90),
]
# Speed-ups this project adds beyond the lecture, once train_gpt2.py has them: a field in
# Settings, its use in build_model/time_training, and one Rung here.
EXTRA_RUNGS = [
    # the CPU's own: without it every step faults the logits' memory in, 4 KB at a time
    Rung("huge pages", "huge_pages", cpu_only=True),
    # fused_ce.py: the loss and the logits' gradient in one Triton kernel, in place, instead
    # of the fp32 log-softmax, nll_loss's zero-filled gradient and their passes
    Rung("fused CE", "fused_ce", cuda_only=True),
    # The memory-bound kernels (layernorm, GELU, residual adds, casts) are Triton kernels
    # that inductor writes; coordinate descent tries their block sizes and warp counts one
    # at a time and keeps the fastest. The same arithmetic, only scheduled differently.
    Rung("coordinate descent", "cd_tuning", cuda_only=True),
]


class ExplicitAttention(CausalSelfAttention):
    """Attention as the lecture first writes it, before flash attention: the (T, T) matrix
    of scores is materialized, masked and softmaxed in memory. Same parameters as
    CausalSelfAttention, so the two give the same logits for the same weights."""

    def __init__(self, config):
        super().__init__(config)
        n = config.block_size
        # True above the diagonal: the future positions a token may not attend to
        self.register_buffer("future", torch.ones(n, n, dtype=torch.bool).triu(1),
                             persistent=False)

    def attend(self, q, k, v, is_causal):
        # q, k, v: (B, nh, T, hs); only training's square, causal case is needed here
        assert is_causal and q.size(2) == k.size(2), "the explicit attention is for training"
        T, hs = q.size(2), q.size(3)
        att = (q @ k.transpose(-2, -1)) / hs ** 0.5  # (B, nh, T, T)
        att = att.masked_fill(self.future[:T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)
        return att @ v  # (B, nh, T, hs)


@dataclass
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    batch_size: int
    seq_len: int


GPU_SHAPE = Shape(n_layer=12, n_head=12, n_embd=768, batch_size=16, seq_len=1024)
CPU_SHAPE = Shape(n_layer=4, n_head=4, n_embd=256, batch_size=4, seq_len=256)


def build_model(settings, shape, device, seed=1337):
    """The same weights for every rung: a 50257-vocab GPT from `seed`; with vocab_50304,
    the padded model takes all of them and only its 47 extra embedding rows are new."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=shape.seq_len, vocab_size=GPT2_VOCAB, n_layer=shape.n_layer,
                       n_head=shape.n_head, n_embd=shape.n_embd)
    model = GPT(config, fused_ce=settings.fused_ce)
    if settings.vocab_50304:
        padded = GPT(dataclasses.replace(config, vocab_size=PADDED_VOCAB), settings.fused_ce)
        padded_state = padded.state_dict()  # views of padded's parameters
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                # the first 50257 rows of the (tied) embedding; every other tensor whole
                padded_state[name][:tensor.size(0)].copy_(tensor)
        model = padded
    if not settings.flash:
        for block in model.transformer.h:
            explicit = ExplicitAttention(model.config)
            explicit.load_state_dict(block.attn.state_dict())
            block.attn = explicit
    return model.to(device)


def train_step(model, optimizer, x, y, bf16):
    """One optimizer step as train_gpt2.py takes it (one micro step); -> the loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device.type, bf16):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock


def peak_rss_mb():
    """This process's peak resident memory. On Linux VmHWM, which reset_peak_rss() can
    reset; ru_maxrss is not used there, as a process started by a bigger one (pytest,
    bench.py itself) inherits its parent's peak in ru_maxrss through fork and exec."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource  # macOS: ru_maxrss is the process's own peak, in bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss():
    """Start a new peak: Linux lets a process reset its high-water mark (VmHWM). Elsewhere
    the peak only grows, so a measurement after a bigger one reads low."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss_mb()


def time_training(settings, shape, device, steps, warmup):
    """-> dict of ms/step, tokens/s, MFU, peak memory and losses over `steps` timed steps
    of one fixed random batch; warm-up steps (compilation, allocator) are untimed, and
    the device is synchronized before each reading of the clock."""
    device_type = device.split(":")[0]
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        rss_before = reset_peak_rss()
    torch.set_float32_matmul_precision("high" if settings.tf32 else "highest")
    if settings.huge_pages and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        raise RuntimeError("huge pages need a process started with them: in_fresh_process")
    model = build_model(settings, shape, device)
    from torch._inductor import config as inductor_config
    inductor_config.coordinate_descent_tuning = settings.cd_tuning
    step_model = torch.compile(model) if settings.compile else model
    # the project's optimizer, fused as the rung says rather than chosen from the device
    optimizer = model.configure_optimizers(0.1, 6e-4, device_type, fused=settings.fused_adamw)
    B, T = shape.batch_size, shape.seq_len
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(GPT2_VOCAB, (2, B, T), generator=gen).to(device)
    losses, times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(train_step(step_model, optimizer, x, y, settings.bf16))
        synchronize(device_type)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    # the fastest step: every step does the same work, so a slower one was disturbed (by
    # another process on a shared CPU, say); on a GPU the steps hardly differ
    seconds = min(times)
    if device_type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        memory = peak_rss_mb() - rss_before
    peak = peak_flops(device_type)
    tokens_per_s = B * T / seconds
    # the FLOPs of the model as built (padded vocabulary included: the work the device
    # does) against the bf16 peak at every rung, as the lecture and llm.c count MFU
    mfu = None if peak is None else flops_per_token(model.config, T) * tokens_per_s / peak
    return {"ms_per_step": 1000 * seconds, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "peak_memory_mb": memory, "losses": [loss.item() for loss in losses]}


def in_fresh_process(fn, *args, env):
    """fn(*args) in a new python whose environment holds `env` from its start: for the
    settings PyTorch reads once (THP_MEM_ALLOC_ENABLE, at the first tensor)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # a spawned child starts with this process's environment
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def skip_reason(rung, device_type, cpu_compile):
    if rung.cuda_only and device_type != "cuda":
        return "CUDA only"
    if rung.cpu_only and device_type != "cpu":
        return "CPU only"
    if rung.turns_on == "bf16" and not bf16_native(device_type):
        return "no bf16 in this device's hardware"
    if rung.turns_on == "compile" and device_type != "cuda" and not cpu_compile:
        return "slow to compile on CPU: --cpu-compile"
    return None


LADDER_COLUMNS = f"{'rung':<17} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'peak mem':>10} " \
                 f"{'loss':>8} {'A100 ms':>8}"


def format_rung(row):
    lecture = f"{row['lecture_ms']:.0f}" if row["lecture_ms"] else "-"
    if row.get("skipped"):
        return f"{row['rung']:<17} skipped: {row['skipped']:<46} {lecture:>8}"
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
    return (f"{row['rung']:<17} {row['ms_per_step']:9.1f} {row['tokens_per_s']:10,.0f} "
            f"{mfu:>6} {row['peak_memory_mb']:7,.0f} MB {row['losses'][-1]:8.4f} {lecture:>8}")


def run_ladder(args):
    device, device_type = resolve_device(args.device)
    default = GPU_SHAPE if device_type == "cuda" else CPU_SHAPE
    shape = Shape(*(getattr(args, f.name) or getattr(default, f.name)
                    for f in dataclasses.fields(Shape)))
    steps = args.steps or (20 if device_type == "cuda" else 10)
    name = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    print(f"ladder on {name}: {shape}, {steps} timed steps after {args.warmup} warm-up")
    print(LADDER_COLUMNS)
    settings, rows = Settings(), []
    precision = torch.get_float32_matmul_precision()
    rungs = RUNGS + EXTRA_RUNGS
    names = [rung.name for rung in rungs]
    if args.start and args.start not in names:
        raise UserError(f"--from {args.start!r}: no such rung; one of: {', '.join(names)}")
    first = names.index(args.start) if args.start else 0
    try:
        for i, rung in enumerate(rungs):
            row = {"rung": rung.name, "lecture_ms": rung.lecture_ms,
                   "skipped": skip_reason(rung, device_type, args.cpu_compile)}
            if i < first and not row["skipped"]:
                # on, as the rungs below need it, but not timed: --from starts later
                settings = dataclasses.replace(settings, **{rung.turns_on: True}) \
                    if rung.turns_on else settings
                row["skipped"] = "on, not timed (--from)"
            elif not row["skipped"]:
                trial = settings
                if rung.turns_on:
                    trial = dataclasses.replace(settings, **{rung.turns_on: True})
                try:
                    run = (trial, shape, device, steps, args.warmup)
                    row.update(in_fresh_process(time_training, *run,
                                                env={"THP_MEM_ALLOC_ENABLE": "1"})
                               if trial.huge_pages else time_training(*run))
                    settings = trial
                except Exception as e:  # e.g. no compiler for torch.compile, out of memory
                    row["skipped"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:40]}"
                if trial.compile:
                    torch._dynamo.reset()  # no compiled graphs carried into the next rung
            rows.append(row)
            print(format_rung(row), flush=True)
    finally:
        torch.set_float32_matmul_precision(precision)
        if "torch._inductor.config" in sys.modules:
            sys.modules["torch._inductor.config"].coordinate_descent_tuning = False
    print("A100 ms: build-nanogpt's lecture, GPT-2 124M, B=16, T=1024. llm.c: ~468k tokens/s "
          "per H100 on 8xH100 (~40% MFU), ~56% MFU on 8xA100.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "steps": steps,
                       "warmup": args.warmup, "shape": dataclasses.asdict(shape),
                       "rungs": rows}, f, indent=1)
    return rows

# -----------------------------------------------------------------------------
# Where a training step's time goes: torch.profiler over a few steps of the real step, its
# kernels grouped by what they compute.

# (group, substrings of a kernel's or an op's name), first match wins: cuBLAS's and
# cuDNN's kernel names on a GPU, aten's op names on a CPU, inductor's triton_* kernels
KERNEL_GROUPS = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::linear", "aten::matmul")),
    ("elementwise", ("triton_", "elementwise", "fill", "copy", "cat", "layer_norm", "gelu",
                     "aten::add", "aten::mul", "aten::div", "aten::sum", "reduce", "embedding",
                     "index")),
]


def kernel_group(name):
    lower = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(key in lower for key in keys):
            return group
    return "other"


def group_times(times, top=3):
    """{kernel name: microseconds} -> [(group, microseconds, [(name, us), ...the `top`
    largest])], largest group first."""
    groups = {}
    for name, us in times.items():
        groups.setdefault(kernel_group(name), []).append((name, us))
    rows = [(g, sum(us for _, us in ks), sorted(ks, key=lambda k: -k[1])[:top])
            for g, ks in groups.items()]
    return sorted(rows, key=lambda r: -r[1])


def profile_step(shape, device, steps=3, warmup=3, cd_tuning=False, fused_ce=False, top=3):
    """Kernel time per training step at `shape`, as train_gpt2.py trains on the device
    (compile and bf16 on a GPU; vocab 50304, SDPA, fused AdamW): -> (group_times rows in
    ms per step with each group's `top` largest kernels, the step's wall ms). On a CPU the
    ops' own CPU time stands in."""
    from torch.profiler import ProfilerActivity, profile
    device_type = device.split(":")[0]
    cuda = device_type == "cuda"
    settings = Settings(tf32=cuda, bf16=bf16_native(device_type), compile=cuda, flash=True,
                        vocab_50304=True, fused_adamw=True, cd_tuning=cd_tuning,
                        fused_ce=fused_ce)
    model = build_model(settings, shape, device)
    from torch._inductor import config as inductor_config
    inductor_config.coordinate_descent_tuning = cd_tuning
    step_model = torch.compile(model) if settings.compile else model
    optimizer = model.configure_optimizers(0.1, 6e-4, device_type, fused=True)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(GPT2_VOCAB, (2, shape.batch_size, shape.seq_len), generator=gen).to(device)
    for _ in range(warmup):
        train_step(step_model, optimizer, x, y, settings.bf16)
    synchronize(device_type)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(step_model, optimizer, x, y, settings.bf16)
        synchronize(device_type)
    wall_ms = 1000 * (time.perf_counter() - t0) / steps
    times = {}
    if cuda:  # the kernels themselves, by their time on the GPU
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name] = times.get(e.name, 0) + e.device_time_total
    else:  # aten ops by their own CPU time (their callees excluded)
        for e in prof.key_averages():
            if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                times[e.key] = e.self_cpu_time_total
    rows = [(g, us / steps / 1000, [(n, t / steps / 1000) for n, t in top])
            for g, us, top in group_times(times, top)]
    inductor_config.coordinate_descent_tuning = False
    return rows, wall_ms


def run_profile(args):
    device, device_type = resolve_device(args.device)
    default = Shape(12, 12, 768, 64, 1024) if device_type == "cuda" else CPU_SHAPE
    shape = Shape(*(getattr(args, f.name) or getattr(default, f.name)
                    for f in dataclasses.fields(Shape)))
    name = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    rows, wall_ms = profile_step(shape, device, steps=args.steps, cd_tuning=args.cd_tuning,
                                 fused_ce=args.fused_ce, top=max(3, args.kernels))
    total = sum(ms for _, ms, _ in rows)
    extras = ", coordinate descent tuning" * args.cd_tuning + ", fused CE" * args.fused_ce
    print(f"profile on {name}: {shape}{extras}: {wall_ms:.1f} ms/step wall, {total:.1f} "
          "ms/step of "
          f"{'GPU kernels' if device_type == 'cuda' else 'CPU op time'}")
    print(f"{'group':<14} {'ms/step':>8} {'share':>6}  largest")
    for group, ms, top in rows:
        largest = "; ".join(f"{n[:48]} {t:.2f}" for n, t in top[:3])
        print(f"{group:<14} {ms:8.2f} {100 * ms / total:5.1f}%  {largest}")
    if args.kernels:
        # the groups' kernels one per line, the next lever's candidates: their names say
        # what inductor fused into each (triton_poi/red/per_fused_<ops>_<n>)
        for group, ms, top in rows:
            print(f"{group}, its {min(args.kernels, len(top))} largest (ms/step):")
            for n, t in top[:args.kernels]:
                print(f"  {t:8.3f}  {n[:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "shape": dataclasses.asdict(shape), "wall_ms": wall_ms,
                       "cd_tuning": args.cd_tuning, "fused_ce": args.fused_ce, "groups": rows},
                      f, indent=1)
    return rows

# -----------------------------------------------------------------------------
# The fused cross-entropy alone: the model's last matmul and its loss, forward and backward,
# at one micro step's shape, as the compiled model computes them and through fused_ce.py.

# (chunk rows, (columns per block, warps per program)) of fused_ce.py's function to time
FUSED_CE_LAUNCHES = [(65536, (8192, 32)), (65536, (16384, 32)), (65536, (32768, 32)),
                     (65536, (4096, 8)), (16384, (8192, 32))]


def bench_fused_ce(device, rows=65536, n_embd=768, vocab=PADDED_VOCAB,
                   launches=FUSED_CE_LAUNCHES, compile_plain=True, steps=10, warmup=3):
    """Yields one dict per way, as it is measured: ms per forward + backward (the fastest
    of `steps`), peak memory above the inputs, and the relative distance of the loss and
    both gradients from the plain path's (or why the way failed). The plain path is the
    model's own: lm_head, then F.cross_entropy, under bf16 autocast where the device has
    it, torch.compile'd on CUDA."""
    device_type = device.split(":")[0]
    bf16 = bf16_native(device_type)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_embd, generator=gen).to(device).requires_grad_()  # as ln_f's
    w = (0.02 * torch.randn(vocab, n_embd, generator=gen)).to(device).requires_grad_()
    targets = torch.randint(min(vocab, GPT2_VOCAB), (rows,), generator=gen).to(device)

    def plain(x, w, targets):
        return F.cross_entropy(F.linear(x, w), targets)

    ways = [("compiled F.cross_entropy" if compile_plain else "F.cross_entropy",
             torch.compile(plain) if compile_plain else plain)]
    for chunk, launch in launches:
        ways.append((f"fused, {chunk} rows/chunk, block {launch[0]}, {launch[1]} warps",
                     lambda x, w, t, c=chunk, la=launch:
                     fused_ce.fused_linear_cross_entropy(x, w, t, c, la)))
    reference = None
    for name, fn in ways:
        try:
            times, out, peak = time_loss(fn, x, w, targets, device_type, bf16, steps, warmup)
        except Exception as e:  # a launch that does not fit the device, say: the next one
            yield {"way": name, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"}
            continue
        if reference is None:
            reference = out
        dist = [((a - b).norm() / b.norm()).item() for a, b in zip(out, reference)]
        yield {"way": name, "ms": 1000 * min(times), "peak_gib": peak, "loss": out[0].item(),
               "dist_loss": dist[0], "dist_grad_x": dist[1], "dist_grad_w": dist[2]}


def time_loss(fn, x, w, targets, device_type, bf16, steps, warmup):
    """fn(x, w, targets)'s forward and backward `warmup + steps` times: -> (the timed
    seconds, the last (loss, grad x, grad w) in fp32, peak GiB above the inputs on CUDA)."""
    times, peak = [], None
    for i in range(warmup + steps):
        x.grad = w.grad = None
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        synchronize(device_type)
        t0 = time.perf_counter()
        with autocast(device_type, bf16):
            loss = fn(x, w, targets)
        loss.backward()
        synchronize(device_type)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if device_type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    return times, (loss.detach().float(), x.grad.float(), w.grad.float()), peak


def bench_cross_entropy_alone(device, rows=65536, vocab=PADDED_VOCAB, launches=FUSED_CE_LAUNCHES,
                              compile_plain=True, steps=10, warmup=3):
    """The loss and the logits' gradient alone, from bf16 logits (rows, vocab): the
    compiled F.cross_entropy forward + backward against fused_ce.py's kernel at each launch.
    Yields {way, ms, TB/s}: the bandwidth counts the fewest bytes the work must move, the
    logits read once and their gradient written once (METHOD: the floor is that over the
    card's copy bandwidth, about 3.0 TB/s on an H100)."""
    device_type = device.split(":")[0]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen).to(device, torch.bfloat16)
    targets = torch.randint(min(vocab, GPT2_VOCAB), (rows,), generator=gen).to(device)
    floor_bytes = 2 * logits.numel() * logits.element_size()

    def loss(z):
        return F.cross_entropy(z.float(), targets)  # in fp32, as under autocast

    compiled = torch.compile(loss) if compile_plain else loss
    ways = [("compiled F.cross_entropy" if compile_plain else "F.cross_entropy",
             lambda z: compiled(z.requires_grad_()).backward())]
    ways += [(f"kernel, block {la[0]}, {la[1]} warps",
              lambda z, la=la: fused_ce.cross_entropy_rows(z, targets, 1 / rows, la))
             for la in dict.fromkeys(la for _, la in launches)]  # each launch once
    for name, fn in ways:
        try:
            times = []
            for i in range(warmup + steps):
                z = logits.clone()  # the kernel overwrites its input
                synchronize(device_type)
                t0 = time.perf_counter()
                fn(z)
                synchronize(device_type)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # a launch that does not fit the device, say: the next one
            yield {"way": name, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"}
            continue
        yield {"way": name, "ms": 1000 * min(times), "tb_s": floor_bytes / min(times) / 1e12}


def run_fused_ce(args):
    device, device_type = resolve_device("auto")
    if device_type != "cuda":
        raise UserError("bench.py fused-ce times a Triton kernel on a CUDA GPU; on a CPU, "
                        "tests/test_fused_ce.py checks its arithmetic")
    print(f"lm_head + cross-entropy, forward + backward, on {torch.cuda.get_device_name()}: "
          f"{args.rows} rows x 768 -> {PADDED_VOCAB}, bf16 autocast")
    print(f"{'way':<50} {'ms':>7} {'peak':>9}  distance from the first: loss, grad x, grad w")
    results = []
    for r in bench_fused_ce(device, rows=args.rows):
        results.append(r)
        if "failed" in r:
            print(f"{r['way']:<50} failed: {r['failed']}", flush=True)
            continue
        print(f"{r['way']:<50} {r['ms']:7.2f} {r['peak_gib']:5.1f} GiB  {r['dist_loss']:.1e}, "
              f"{r['dist_grad_x']:.1e}, {r['dist_grad_w']:.1e}", flush=True)
    print(f"\nthe cross-entropy alone, from {args.rows} x {PADDED_VOCAB} bf16 logits: forward + "
          "backward (TB/s: logits read once, gradient written once)")
    for r in bench_cross_entropy_alone(device, rows=args.rows):
        results.append(r)
        print(f"{r['way']:<50} " + (f"failed: {r['failed']}" if "failed" in r else
                                    f"{r['ms']:7.2f} {r['tb_s']:5.2f} TB/s"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": args.rows,
                       "results": results}, f, indent=1)
    return results

# -----------------------------------------------------------------------------
# CPU benchmarks: each returns Results, a measured value against a target.


@dataclass
class Result:
    name: str
    measured: str
    target: str = ""  # empty: reported, not judged
    passed: bool = None
    detail: str = ""


def best_of(runs, rounds=2):
    """Runs each callable of the dict `runs` `rounds` times, interleaved; -> (best seconds,
    last result) per key. On a shared machine a slow stretch then hits both sides of a
    ratio, and the best round is the least disturbed one."""
    seconds, results = {}, {}
    for _ in range(rounds):
        for key, run in runs.items():
            t0 = time.perf_counter()
            results[key] = run()
            seconds[key] = min(seconds.get(key, float("inf")), time.perf_counter() - t0)
    return seconds, results


def make_corpus(path, n_tokens, seed=0):
    """A jsonl of ~n_tokens tokens: input.txt's paragraphs, drawn at random into documents
    of 2-6 KB (FineWeb-Edu's documents are a few KB)."""
    with open(INPUT_TXT, encoding="utf-8") as f:
        text = f.read()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    bytes_per_token = len(text.encode()) / len(get_encoding().encode_ordinary(text))
    rng, written = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_tokens * bytes_per_token:
            doc, size = [], rng.randint(2000, 6000)
            while sum(map(len, doc)) < size:
                doc.append(rng.choice(paragraphs))
            doc = "\n\n".join(doc)
            f.write(json.dumps({"text": doc}) + "\n")
            written += len(doc.encode())


def count_tokens(texts):
    # the limit: tiktoken's own batch encoder, one thread, and nothing else done with
    # the tokens (not even sending them back)
    return sum(map(len, get_encoding().encode_ordinary_batch(texts, num_threads=1)))


def bench_tokenize(n_tokens, tmp):
    """fineweb's tokenizing loop (pool of workers, encode_documents, pack_shards, in
    memory) and the whole `python fineweb.py --input X.jsonl` command, start-up and a
    fresh datasets cache included, against the limit: encode_ordinary_batch on the same
    chunks of documents, one process per core. A ratio near 1 means fineweb adds little
    to the tokenizer's own cost; above 1 is possible, as fineweb's encode_to_numpy skips
    the Python list of ints that the limit builds."""
    corpus = os.path.join(tmp, "corpus.jsonl")
    make_corpus(corpus, n_tokens)
    with open(corpus, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    chunks = [docs[i:i + fineweb.DOCS_PER_TASK] for i in range(0, len(docs), fineweb.DOCS_PER_TASK)]
    workers = os.cpu_count() or 1
    get_encoding()  # built once here, inherited by forked workers as fineweb's are
    with multiprocessing.Pool(workers) as pool:
        pool.map(count_tokens, chunks[:workers])  # workers started and warm
        seconds, counts = best_of({
            "limit": lambda: sum(pool.imap(count_tokens, chunks)),
            # build_shards' loop without the files: encode in the pool, pack into shards
            "loop": lambda: sum(len(shard) for shard, _ in fineweb.pack_shards(
                pool.imap(fineweb._encode_task, fineweb._tasks(iter(docs), 0)), 10 ** 8))})
    n = counts["limit"]
    assert counts["loop"] == n + len(docs), "the loop does the limit's work, plus an EOT per doc"
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(tmp, "hf_cache"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(HERE, "fineweb.py"), "--input", corpus,
                    "--out-dir", os.path.join(tmp, "shards")], check=True, env=env,
                   capture_output=True)
    command_s = time.perf_counter() - t0
    limit, loop, command = n / seconds["limit"], n / seconds["loop"], n / command_s
    detail = (f"{n / 1e6:.1f}M tokens in {len(docs):,} docs, {workers} processes: limit "
              f"{limit / 1e6:.2f}M tok/s, loop {loop / 1e6:.2f}M, command {command / 1e6:.2f}M "
              f"({command_s:.1f} s)")
    return [Result("tokenize: fineweb loop / limit", f"{loop / limit:.2f}x", ">= 0.9x",
                   loop / limit >= 0.9, detail),
            Result("tokenize: fineweb.py command / limit", f"{command / limit:.2f}x", ">= 0.8x",
                   command / limit >= 0.8)]


def loader_child(way, shard, B, T):
    """Runs in a fresh python (bench_loader starts it), so its RSS is the loader's alone."""
    B, T = int(B), int(T)
    rss_before = reset_peak_rss()
    t0 = time.perf_counter()
    if way == "memmap":
        DataLoaderLite(os.path.dirname(shard), "train", B, T).next_batch()
    else:  # build-nanogpt: the whole shard into memory as int64 tokens, then slice
        tokens = torch.from_numpy(np.fromfile(shard, dtype=np.uint16, offset=fineweb.HEADER_BYTES)
                                  .astype(np.int64))
        buf = tokens[:B * T + 1]
        buf[:-1].view(B, T), buf[1:].view(B, T)
    ms = 1000 * (time.perf_counter() - t0)
    print(json.dumps({"ms": ms, "mb": peak_rss_mb() - rss_before}))


def write_sparse_shard(path, n_tokens):
    """An llm.c shard of n_tokens zeros that takes no disk: the header, then a hole."""
    header = np.zeros(fineweb.HEADER_INTS, dtype="<i4")
    header[:3] = fineweb.MAGIC, fineweb.VERSION, n_tokens
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.truncate(fineweb.HEADER_BYTES + 2 * n_tokens)


def measure_loader(way, shard, B, T):
    """loader_child in a fresh python -> {"ms": time to first batch, "mb": peak RSS increase}."""
    code = "import sys, bench; bench.loader_child(*sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, way, shard, str(B), str(T)],
                         cwd=HERE, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def bench_loader(tmp, n_tokens=10 ** 8, B=8, T=1024):
    """Time to the first batch and peak RSS increase of DataLoaderLite (a memory map of the
    shard; only the window read is ever in memory) against build-nanogpt's loader (the
    whole shard as int64), on a 100M-token shard. Each runs in a fresh process."""
    shard = os.path.join(tmp, "bench_train_000001.bin")
    write_sparse_shard(shard, n_tokens)
    mine, plain = (measure_loader(way, shard, B, T) for way in ("memmap", "int64"))
    where = f"{n_tokens / 1e6:.0f}M-token shard, B={B}, T={T}"
    return [Result("loader: peak RSS increase", f"{mine['mb']:.1f} MB", "< 100 MB",
                   mine["mb"] < 100, f"{where}; whole shard as int64: {plain['mb']:,.0f} MB"),
            Result("loader: time to first batch", f"{mine['ms']:.1f} ms", "< 50 ms",
                   mine["ms"] < 50, f"whole shard as int64: {plain['ms']:,.0f} ms")]


def small_model(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=1024, vocab_size=PADDED_VOCAB, n_layer=4, n_head=4, n_embd=256)
    return GPT(config).eval()


def synthetic_hellaswag(n, seed=0):
    """n examples in HellaSwag's format from input.txt's lines: a context of ~40 tokens and
    four endings of ~20, about the real data's lengths."""
    with open(INPUT_TXT, encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line.strip()) > 20]
    rng = random.Random(seed)
    return [{"ctx": " ".join(rng.sample(lines, 4)),
             "endings": [" ".join(rng.sample(lines, 2)) for _ in range(4)],
             "label": rng.randrange(4)} for _ in range(n)]


def bench_hellaswag(n=100, device="cpu", model=None):
    """hellaswag.evaluate with 16 examples per forward (64 rows) against one example per
    forward, as build-nanogpt's loop runs; same model, same examples, both as
    `python hellaswag.py` runs them (bf16 where the device has it, huge pages: see
    main()). Both compute the logits at every position, scored or not, and on a
    CPU that lm_head matmul is already efficient at 4 rows: batching saves per-call
    overhead and little else there. A GPU, idle at 4 rows, is where it pays."""
    device_type = device.split(":")[0]
    model = (model or small_model()).to(device)
    examples = synthetic_hellaswag(n)
    kwargs = dict(device=device, autocast=lambda: autocast(device_type))
    logits = lambda idx: model(idx)[0]  # noqa: E731

    def run(batch_size):
        result = hellaswag.evaluate(logits, examples, batch_size=batch_size, **kwargs)
        synchronize(device_type)
        return result

    hellaswag.evaluate(logits, examples[:2], batch_size=2, **kwargs)  # warm-up
    seconds, results = best_of({batch_size: lambda b=batch_size: run(b)
                                for batch_size in (16, 1)})
    speedup = seconds[1] / seconds[16]
    same = "same" if results[1] == results[16] else "DIFFERENT"
    return [Result("hellaswag: batched / one per forward", f"{speedup:.2f}x", ">= 4x",
                   speedup >= 4, f"{n} examples: {seconds[16]:.2f} s batched, {seconds[1]:.2f} s "
                   f"one at a time; {same} accuracy counts")]


def bench_kvcache(new_tokens=256, prompt=16):
    """GPT.generate with the KV cache (each new token alone through the network) against
    the plain loop that recomputes the whole sequence for every token."""
    model = small_model()
    idx = torch.randint(GPT2_VOCAB, (1, prompt), generator=torch.Generator().manual_seed(0))
    model.generate(idx, 4, temperature=0)  # warm-up
    seconds, outs = best_of({use_cache: lambda c=use_cache: model.generate(
        idx, new_tokens, temperature=0, use_cache=c) for use_cache in (True, False)})
    speedup = seconds[False] / seconds[True]
    same = "same" if torch.equal(outs[True], outs[False]) else "DIFFERENT"
    return [Result("kv cache: cached / recompute", f"{speedup:.1f}x", ">= 5x", speedup >= 5,
                   f"{new_tokens} tokens after {prompt}: {new_tokens / seconds[True]:.0f} tok/s "
                   f"cached, {new_tokens / seconds[False]:.0f} recomputing; {same} greedy tokens")]


def bench_train(steps=10, warmup=2):
    """Training tokens/s at the small CPU shape, as train_gpt2.py runs on a CPU (SDPA,
    vocab 50304, fused AdamW, bf16 where the CPU has it, huge pages, no compile).
    Reported, not judged."""
    settings = Settings(flash=True, vocab_50304=True, fused_adamw=True,
                        bf16=bf16_native("cpu"), huge_pages=True)
    r = time_training(settings, CPU_SHAPE, "cpu", steps, warmup)
    return [Result("train: tokens/s", f"{r['tokens_per_s']:,.0f}", detail=f"{CPU_SHAPE}: "
                   f"{r['ms_per_step']:.0f} ms/step, peak RSS +{r['peak_memory_mb']:.0f} MB")]


CPU_BENCHMARKS = ["tokenize", "loader", "hellaswag", "kvcache", "train"]


def run_cpu(args):
    results = []
    print(f"{'benchmark':<38} {'measured':>10} {'target':>10}  result")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in [args.only] if args.only else CPU_BENCHMARKS:
            new = {"tokenize": lambda: bench_tokenize(args.tokens, tmp),
                   "loader": lambda: bench_loader(tmp),
                   "hellaswag": bench_hellaswag, "kvcache": bench_kvcache,
                   "train": bench_train}[name]()
            for r in new:
                verdict = "report" if r.passed is None else "PASS" if r.passed else "FAIL"
                print(f"{r.name:<38} {r.measured:>10} {r.target:>10}  {verdict}", flush=True)
                if r.detail:
                    print(f"    {r.detail}")
            results += new
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return results

# -----------------------------------------------------------------------------


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="command", required=True)
    ladder = sub.add_parser("ladder", help="the lecture's speed-ups, one rung at a time")
    ladder.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    meaning = {"n_layer": "transformer blocks", "n_head": "attention heads",
               "n_embd": "embedding width", "batch_size": "rows per step (B)",
               "seq_len": "tokens per row (T), also the block size"}
    for field, what in meaning.items():
        ladder.add_argument("--" + field.replace("_", "-"), type=int, help=(
            f"{what}; default {getattr(GPU_SHAPE, field)} on CUDA, "
            f"{getattr(CPU_SHAPE, field)} elsewhere"))
    ladder.add_argument("--steps", type=int, help="timed steps per rung (default 20 on CUDA, "
                        "10 elsewhere)")
    ladder.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before the clock starts, where compilation "
                        "happens (default: %(default)s)")
    ladder.add_argument("--from", dest="start", metavar="RUNG",
                        help="time the rungs from RUNG on; those before it are on, untimed "
                        "(default: time them all)")
    ladder.add_argument("--cpu-compile", action="store_true",
                        help="run the torch.compile rung off CUDA too (minutes on a CPU)")
    ladder.add_argument("--json", metavar="OUT", help="also write the table to this file")
    prof = sub.add_parser("profile", help="where a training step's time goes, by kernel group")
    prof.add_argument("--device", default="auto",
                      help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    for field, what in meaning.items():
        prof.add_argument("--" + field.replace("_", "-"), type=int, help=(
            f"{what}; default GPT-2 (124M) at B=64 on CUDA, {getattr(CPU_SHAPE, field)} "
            "elsewhere"))
    prof.add_argument("--steps", type=int, default=3, help="profiled steps (default: 3)")
    prof.add_argument("--cd-tuning", action="store_true",
                      help="with inductor's coordinate descent tuning (the ladder's rung)")
    prof.add_argument("--kernels", type=int, default=0, metavar="N",
                      help="also list each group's N largest kernels (default: none)")
    prof.add_argument("--fused-ce", action="store_true",
                      help="with the loss through fused_ce.py (the ladder's fused CE rung)")
    prof.add_argument("--json", metavar="OUT", help="also write the table to this file")
    fce = sub.add_parser("fused-ce", help="lm_head + cross-entropy at one micro step's shape: "
                         "compiled F.cross_entropy against fused_ce.py's launches")
    fce.add_argument("--rows", type=int, default=65536,
                     help="rows of logits, B*T (default: %(default)s, the gpt2 preset's B=64)")
    fce.add_argument("--json", metavar="OUT", help="also write the table to this file")
    cpu = sub.add_parser("cpu", help="CPU hot paths against their plain alternatives")
    cpu.add_argument("--only", choices=CPU_BENCHMARKS, help="run one benchmark (default: all)")
    cpu.add_argument("--tokens", type=int, default=20_000_000,
                     help="size of the tokenization corpus (default: %(default)s; 100000000 "
                          "to measure at FineWeb shard size)")
    cpu.add_argument("--json", metavar="OUT", help="also write the results to this file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "cpu":
        # as train_gpt2.py and hellaswag.py run on a CPU; before any tensor, as it must be
        use_huge_pages()
    {"ladder": run_ladder, "profile": run_profile, "cpu": run_cpu,
     "fused-ce": run_fused_ce}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
