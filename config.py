"""
The configuration of a training run: one dataclass whose defaults are build-nanogpt's
recipe for GPT-2 (124M), presets that change some of its fields, and a --flag for every
field on top. A checkpoint stores the resolved configuration as plain data, and
`--resume` starts from it.
"""

import argparse
import dataclasses
import os
import shutil
from dataclasses import dataclass

from checkpoint import (newer_checkpoints, read_checkpoint, read_newest_checkpoint,
                        spare_log_path)
from common import ArgumentParser, UserError, launched_rank0

def opt(default, help, parse=None):
    # a config field and its --flag's help in one place; build_parser() makes the flags,
    # which read their value with parse (default: the field's type)
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


def micro_batch(text):
    """--batch-size: a number of rows, or 'auto' for the largest that fits (device.py)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of rows nor 'auto'")


@dataclass
class TrainConfig:
    preset: str = opt("gpt2", "a starting configuration that the flags below override")
    # model shape
    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_embd: int = opt(768, "embedding width")
    block_size: int = opt(1024, "longest sequence the model can see")
    # 50257 padded to a multiple of 128: matmuls on GPUs like round numbers
    vocab_size: int = opt(50304, "embedding rows (50304: GPT-2's 50257 padded)")
    # data
    data_dir: str = opt("edu_fineweb10B", "directory of PREFIX_train_N/PREFIX_val_N shards "
                                          "(fineweb.py)")
    shuffle: bool = opt(True, "shuffle shards and windows every epoch")
    # 20 steps of 8 x 64 x 1024 tokens, as build-nanogpt evaluated
    val_tokens: int = opt(10_485_760, "tokens of the val split per evaluation")
    # optimization: build-nanogpt's recipe for GPT-2 (124M) on 10B tokens
    batch_size: int = opt(64, "micro batch B: rows per forward pass, or auto: on CUDA the "
                              "largest of B, B/2, ... that fits (the preset's B elsewhere)",
                          parse=micro_batch)
    seq_len: int = opt(1024, "tokens per row (T)")
    # ~0.5M tokens per step, as GPT-3 Small
    total_batch_size: int = opt(2 ** 19, "tokens per optimizer step; gradient accumulation "
                                         "fills the gap")
    max_steps: int = opt(19073, "optimizer steps, where the cosine ends")  # 10B / 2**19
    warmup_steps: int = opt(715, "steps of linear warmup")  # GPT-3's 375M tokens / 2**19
    max_lr: float = opt(6e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = opt(0.1, "AdamW weight decay on 2-D parameters")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this")
    seed: int = opt(1337, "seed of the initialization and the data order")
    # what runs along the way, every N steps
    eval_every: int = opt(250, "steps between validation losses (0: never)")
    hellaswag_every: int = opt(250, "steps between HellaSwag evaluations (0: never)")
    hellaswag_jsonl: str = opt("", "HellaSwag examples from this local jsonl file")
    hellaswag_limit: int = opt(0, "only the first N HellaSwag examples (0: all)")
    sample_every: int = opt(250, "steps between printed samples (0: never)")
    checkpoint_every: int = opt(5000, "steps between checkpoints (0: the last only)")
    keep_checkpoints: int = opt(2, "keep the newest K checkpoints (0: all)")
    # machinery
    log_dir: str = opt("log", "where log.txt and checkpoints go")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = opt(None, "torch.compile the model (default: on with CUDA)")
    dtype: str = opt("auto", "auto, bf16, fp16 or fp32: the autocast dtype; auto picks bf16 "
                             "where the device does it in hardware (Ampere+ GPUs, CPUs with "
                             "AVX512-BF16 or AMX), fp16 with a GradScaler on older CUDA GPUs, "
                             "else fp32")
    bf16: bool = opt(None, "the same as --dtype bf16; --no-bf16 is --dtype fp32")
    dist_timeout: int = opt(30, "minutes a collective waits for a dead rank before failing")
    fused_ce: bool = opt(False, "lm_head + cross-entropy in one Triton kernel (fused_ce.py; "
                                "CUDA only; off until a GPU has measured it faster)")


def gpt3_shape(n_layer, n_embd, n_head, total, lr, B):
    # GPT-3 paper (Brown et al. 2020) table 2.1: context 2048, batch and lr as listed,
    # warmup 375M tokens, trained here on 10B tokens
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=2048, seq_len=2048,
                batch_size=B, total_batch_size=total, max_lr=lr,
                warmup_steps=375_000_000 // total, max_steps=10 ** 10 // total)


PRESETS = {
    "gpt2": {},
    # GPT-2's larger shapes, with the learning rates and batch sizes GPT-3 used at the
    # nearest size
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, max_lr=3e-4, batch_size=32),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, max_lr=2.5e-4, batch_size=16),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, max_lr=2e-4, batch_size=8,
                    total_batch_size=2 ** 20, warmup_steps=358, max_steps=9537),
    "gpt3-small": gpt3_shape(12, 768, 12, 2 ** 19, 6e-4, 32),
    "gpt3-medium": gpt3_shape(24, 1024, 16, 2 ** 19, 3e-4, 16),
    "gpt3-large": gpt3_shape(24, 1536, 16, 2 ** 19, 2.5e-4, 8),
    # table 2.1 lists 24 heads of 128 for XL, which is not 2048 wide: we keep d_head 128
    "gpt3-xl": gpt3_shape(24, 2048, 16, 2 ** 20, 2e-4, 8),
    # the embedded default: a small GPT on input.txt, minutes on a laptop CPU
    "shakespeare": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, data_dir="",
                        batch_size=4, seq_len=128, total_batch_size=512, max_steps=400,
                        warmup_steps=20, max_lr=2e-3, weight_decay=0.1, val_tokens=8192,
                        eval_every=100, hellaswag_every=0, sample_every=200,
                        checkpoint_every=200, log_dir="log_shakespeare"),
}


def preset_micro_batch(preset):
    """The micro-batch a preset sets, where --batch-size auto starts."""
    return PRESETS[preset].get("batch_size", TrainConfig.batch_size)


def build_parser():
    p = ArgumentParser(description="Train GPT-2 from scratch, or use a checkpoint.",
                       argument_default=argparse.SUPPRESS)
    flag = p.add_argument
    # one --flag per TrainConfig field; what is not given comes from the preset
    for f in dataclasses.fields(TrainConfig):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.name == "preset":
            help += " (default: gpt2)"
        elif f.default is not None:  # None: the help says what decides
            help += f" (gpt2 preset: {f.default!r})"
        if f.name == "preset":
            flag(name, choices=sorted(PRESETS), help=help)
        elif f.type is bool:
            flag(name, action=argparse.BooleanOptionalAction, help=help)
        elif f.name == "dtype":
            flag(name, choices=("auto", "bf16", "fp16", "fp32"), help=help)
        else:
            flag(name, type=f.metadata["parse"] or f.type, help=help)
    # commands other than training
    flag("--resume", nargs="?", const="latest",
         help="continue the newest checkpoint in --log-dir, or the one given")
    flag("--rewind", action="store_true", default=False,
         help="with --resume PATH: go back to a checkpoint older than its run's newest, "
              "whose newer checkpoints the run then replaces (log.txt is kept whole as "
              "log.N.txt first)")
    flag("--sample", action="store_true", default=False,
         help="sample from --checkpoint and exit")
    flag("--export-hf", metavar="OUT_DIR", help="write --checkpoint as a Hugging Face model")
    flag("--plot", metavar="LOG_DIR", help="draw LOG_DIR/log.txt into LOG_DIR/loss.png")
    flag("--checkpoint", help="a model_XXXXX.pt for --sample and --export-hf, or a log dir "
                              "for its newest")
    flag("--prompt", default="Hello, I'm a language model,", help="text to continue (default: %(default)s)")
    flag("--num-samples", type=int, default=4, help="continuations to sample (default: %(default)s)")
    flag("--max-new-tokens", type=int, default=32, help="tokens per continuation (default: %(default)s)")
    flag("--temperature", type=float, default=1.0, help="0 for greedy decoding (default: %(default)s)")
    flag("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default: %(default)s)")
    return p


def parse_config(argv):
    """-> (TrainConfig, the command-line namespace). Preset first, then flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "--sample" if args.sample else "--export-hf" if hasattr(args, "export_hf") else None
    if command and not hasattr(args, "checkpoint"):
        parser.error(f"{command} needs --checkpoint PATH (a model_XXXXX.pt in your log dir)")
    if args.sample and (args.top_k < 1 or not args.prompt):
        parser.error("--sample needs a non-empty --prompt and a --top-k of at least 1")
    if args.rewind and not hasattr(args, "resume"):
        parser.error("--rewind goes with --resume PATH: the older checkpoint to go back to")
    preset = getattr(args, "preset", "gpt2")
    values = dict(PRESETS[preset], preset=preset)
    values.update(given_fields(args))
    return TrainConfig(**values), args


def given_fields(args):
    """The TrainConfig fields set by a flag on the command line."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return fold_bf16({k: v for k, v in vars(args).items() if k in fields})


def fold_bf16(values):
    """--bf16/--no-bf16 are spellings of --dtype bf16/fp32: turn one into the other, so
    that dtype alone decides (a checkpoint from before --dtype stored bf16 only)."""
    if values.get("bf16") is None:
        return values
    dtype = "bf16" if values["bf16"] else "fp32"
    if values.get("dtype", "auto") not in ("auto", dtype):
        raise UserError(f"--{'' if values['bf16'] else 'no-'}bf16 means --dtype {dtype}, "
                        f"not --dtype {values['dtype']}: give one of the two")
    return dict(values, dtype=dtype, bf16=None)


# What a resumed run may set anew. The rest (the model, the batch, the optimizer, the
# data order) comes from the checkpoint, or the run would not continue the same training.
RESUME_MAY_CHANGE = {"max_steps", "eval_every", "val_tokens", "hellaswag_every",
                     "hellaswag_jsonl", "hellaswag_limit", "sample_every", "checkpoint_every",
                     "keep_checkpoints", "log_dir", "data_dir", "device", "compile", "bf16",
                     "dtype", "dist_timeout", "fused_ce"}


def resume_config(saved, given, path):
    """The configuration a checkpoint was trained with (`saved`, as stored in it), and on
    top the flags given on the command line that may change. Another flag that differs
    from the checkpoint's value is refused with one line."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in fold_bf16(saved).items() if k in fields})
    if given.get("batch_size") == "auto":  # auto chose the checkpoint's micro-batch
        given = {k: v for k, v in given.items() if k != "batch_size"}
    for key, value in given.items():
        if key not in RESUME_MAY_CHANGE and value != getattr(cfg, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path} was trained with {flag} {getattr(cfg, key)} (preset "
                            f"{cfg.preset}), and a resumed run keeps it; drop {flag}, or "
                            "start a new run in another --log-dir")
    return dataclasses.replace(cfg, **{k: v for k, v in given.items()
                                       if k in RESUME_MAY_CHANGE})


def check_config(cfg, world_size=1, device_type=None):
    B, T = cfg.batch_size, cfg.seq_len
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
                 "seq_len", "total_batch_size", "max_steps"):
        if getattr(cfg, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be at least 1, got {getattr(cfg, name)}")
    if T > cfg.block_size:
        raise UserError(f"--seq-len {T} is longer than the model's block size {cfg.block_size}; "
                        f"use --seq-len {cfg.block_size} or less (or a larger --block-size)")
    if cfg.total_batch_size % (B * T * world_size):
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not divisible by "
                        f"B*T*world_size = {B}*{T}*{world_size} = {B * T * world_size}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}")
    if cfg.fused_ce and device_type not in (None, "cuda"):
        raise UserError(f"--fused-ce runs a Triton kernel on a CUDA GPU, not on {device_type}: "
                        "drop --fused-ce")


def resume_from(cfg, args, get_lr):
    """--resume [PATH]: -> (the configuration to continue with, the checkpoint dict).
    get_lr is the training script's schedule, to say what a new --max-steps does to it."""
    if args.resume != "latest":
        path, ckpt = args.resume, read_checkpoint(args.resume)
    elif newest := read_newest_checkpoint(cfg.log_dir):
        path, ckpt = newest
    else:
        raise UserError(f"--resume: no checkpoint in {cfg.log_dir}/; start without "
                        "--resume, or give the checkpoint's path")
    given = given_fields(args)
    if args.resume != "latest" and "log_dir" not in given:
        given["log_dir"] = os.path.dirname(path) or "."  # continue beside the checkpoint
    resumed = resume_config(ckpt["config"], given, path)
    # a PATH may be older than its run's newest checkpoint (without one, the newest intact
    # checkpoint is taken, and any newer are damaged: replacing those loses nothing)
    newer = [] if args.resume == "latest" else \
        newer_checkpoints(resumed.log_dir, ckpt["run_id"], ckpt["step"])
    if newer and not args.rewind:
        raise UserError(f"{resumed.log_dir}/ holds this run's newer "
                        f"{os.path.basename(newer[-1])}, which a resume from step "
                        f"{ckpt['step']} would replace: --resume without a path continues the "
                        "newest; --rewind goes back")
    if not launched_rank0():  # every rank reads the checkpoint; one says so
        return resumed, ckpt
    log_path = os.path.join(resumed.log_dir, "log.txt")
    if newer and os.path.exists(log_path):
        shutil.copyfile(log_path, kept := spare_log_path(resumed.log_dir))
        print(f"--rewind: kept {log_path} whole as {kept}; {len(newer)} newer checkpoint(s) "
              f"of this run will be replaced as the run reaches them")
    print(f"resuming from {path} at step {ckpt['step']} (preset {resumed.preset})")
    old_steps, step = ckpt["config"]["max_steps"], ckpt["step"]
    if resumed.max_steps != old_steps and step < resumed.max_steps:
        lr = [get_lr(step, resumed.max_lr, resumed.max_lr * resumed.min_lr_ratio,
                     resumed.warmup_steps, n) for n in (old_steps, resumed.max_steps)]
        print(f"--max-steps {resumed.max_steps} instead of {old_steps}: the cosine now ends at "
              f"step {resumed.max_steps}, so the learning rate at step {step} is {lr[1]:.3e} "
              f"(was {lr[0]:.3e}) and decays from there")
    return resumed, ckpt
