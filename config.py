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
from common import ArgumentParser, Range, UserError, check_ranges, launched_rank0
from tracking import check_packages

def opt(default, help_text, valid=None, parse=None, metavar=None):
    # a config field, its --flag's help and the values it accepts in one place;
    # build_parser() makes the flags, which read their value with parse (default: the
    # field's type), and check_ranges() checks them
    return dataclasses.field(default=default, metadata={"help": help_text, "range": valid,
                                                        "parse": parse, "metavar": metavar})


def micro_batch(text):
    """--batch-size: a number of rows, or 'auto' for the largest that fits (device.py)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of rows nor 'auto'")


AT_LEAST_1 = Range(1)


@dataclass
class TrainConfig:
    preset: str = opt("gpt2", "a starting configuration that the flags below override")
    # model shape
    n_layer: int = opt(12, "transformer blocks", AT_LEAST_1)
    n_head: int = opt(12, "attention heads", AT_LEAST_1)
    n_embd: int = opt(768, "embedding width", AT_LEAST_1)
    block_size: int = opt(1024, "longest sequence the model can see", AT_LEAST_1)
    # 50257 padded to a multiple of 128: matmuls on GPUs like round numbers; token ids are
    # uint16 in the shards
    vocab_size: int = opt(50304, "embedding rows (50304: GPT-2's 50257 padded)",
                          Range(1, 65536))
    # data
    data_dir: str = opt("edu_fineweb10B", "directory of PREFIX_train_N/PREFIX_val_N shards "
                                          "(fineweb.py)")
    shuffle: bool = opt(True, "shuffle shards and windows every epoch")
    # 20 steps of 8 x 64 x 1024 tokens, as build-nanogpt evaluated
    val_tokens: int = opt(10_485_760, "tokens of the val split per evaluation", AT_LEAST_1)
    # optimization: build-nanogpt's recipe for GPT-2 (124M) on 10B tokens
    batch_size: int = opt(64, "micro batch B: rows per forward pass, or auto: on CUDA the "
                              "largest of B, B/2, ... that fits (the preset's B elsewhere)",
                          AT_LEAST_1, parse=micro_batch)
    seq_len: int = opt(1024, "tokens per row (T)", AT_LEAST_1)
    # ~0.5M tokens per step, as GPT-3 Small
    total_batch_size: int = opt(2 ** 19, "tokens per optimizer step; gradient accumulation "
                                         "fills the gap", AT_LEAST_1)
    # 10B / 2**19
    max_steps: int = opt(19073, "optimizer steps, where the cosine ends", AT_LEAST_1)
    # GPT-3's 375M tokens / 2**19
    warmup_steps: int = opt(715, "steps of linear warmup", Range(1, zero="none"))
    # an Adam step moves each weight by about lr: past 1, nothing is learned
    max_lr: float = opt(6e-4, "peak learning rate", Range(0, 1, above=True))
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak", Range(0, 1))
    # decoupled decay shrinks the weights by lr * weight_decay every step
    weight_decay: float = opt(0.1, "AdamW weight decay on 2-D parameters",
                              Range(0, above=True, zero="none"))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this",
                           Range(0, above=True, zero="no clipping"))
    # torch.manual_seed takes 64 bits
    seed: int = opt(1337, "seed of the initialization and the data order", Range(0, 2 ** 64 - 1))
    # what runs along the way, every N steps
    eval_every: int = opt(250, "steps between validation losses", Range(1, zero="never"))
    hellaswag_every: int = opt(250, "steps between HellaSwag evaluations", Range(1, zero="never"))
    hellaswag_jsonl: str = opt("", "HellaSwag examples from this local jsonl file")
    hellaswag_limit: int = opt(0, "only the first N HellaSwag examples", Range(1, zero="all"))
    sample_every: int = opt(250, "steps between printed samples", Range(1, zero="never"))
    checkpoint_every: int = opt(5000, "steps between checkpoints",
                                Range(1, zero="the last only"))
    keep_checkpoints: int = opt(2, "keep the newest K checkpoints", Range(1, zero="all"))
    # machinery
    log_dir: str = opt("log", "where log.txt and checkpoints go")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = opt(None, "torch.compile the model (default: on with CUDA)")
    dtype: str = opt("auto", "auto, bf16, fp16 or fp32: the autocast dtype; auto picks bf16 "
                             "where the device does it in hardware (Ampere+ GPUs, CPUs with "
                             "AVX512-BF16 or AMX), fp16 with a GradScaler on older CUDA GPUs, "
                             "else fp32")
    bf16: bool = opt(None, "the same as --dtype bf16; --no-bf16 is --dtype fp32")
    # a week: far past any collective's time, and inside what a timedelta holds
    dist_timeout: int = opt(30, "minutes a collective waits for a dead rank before failing",
                            Range(1, 7 * 24 * 60))
    # watching the run (tracking.py): what log.txt gets, also live elsewhere
    tensorboard: bool = opt(False, "TensorBoard event files in --log-dir (pip install "
                                   "tensorboard)")
    wandb: str = opt("", "log to this Weights & Biases project (pip install wandb)",
                     metavar="PROJECT")
    wandb_run: str = opt("", "the W&B run's name (default: W&B picks one)", metavar="NAME")
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
        name, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.name == "preset":
            help_text += " (default: gpt2)"
        elif f.default is not None:  # None: the help says what decides
            help_text += f" (gpt2 preset: {f.default!r})"
        if f.name == "preset":
            flag(name, choices=sorted(PRESETS), help=help_text)
        elif f.type is bool:
            flag(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "dtype":
            flag(name, choices=("auto", "bf16", "fp16", "fp32"), help=help_text)
        else:
            flag(name, type=f.metadata["parse"] or f.type, help=help_text,
                 range=f.metadata["range"], metavar=f.metadata["metavar"])
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
    flag("--export-gguf", metavar="FILE", help="write --checkpoint as a GGUF file for llama.cpp, "
                                               "Ollama, LM Studio (pip install gguf)")
    flag("--gguf-type", choices=("f16", "f32"), help="the GGUF's weights (default: f16)")
    flag("--plot", metavar="LOG_DIR", help="draw LOG_DIR/log.txt into LOG_DIR/loss.png")
    flag("--checkpoint", help="a model_XXXXX.pt for --sample and the exports, or a log dir "
                              "for its newest")
    flag("--prompt", default="Hello, I'm a language model,", help="text to continue (default: %(default)s)")
    flag("--num-samples", type=int, default=4, range=AT_LEAST_1,
         help="continuations to sample (default: %(default)s)")
    flag("--max-new-tokens", type=int, default=32, range=AT_LEAST_1,
         help="tokens per continuation (default: %(default)s)")
    # logits / temperature overflow float32 for a temperature near 1e-38: 0.01 is already
    # greedy in all but ties
    flag("--temperature", type=float, default=1.0, range=Range(0.01, zero="greedy"),
         help="softmax temperature of sampling (default: %(default)s)")
    flag("--top-k", type=int, default=50, range=AT_LEAST_1,
         help="sample among the k likeliest tokens (default: %(default)s)")
    return p


def parse_config(argv):
    """-> (TrainConfig, the command-line namespace). Preset first, then flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.exports = [name for name in ("export_hf", "export_gguf") if hasattr(args, name)]
    command = "--sample" if args.sample else "--" + args.exports[0].replace("_", "-") \
        if args.exports else None
    if command and not hasattr(args, "checkpoint"):
        parser.error(f"{command} needs --checkpoint PATH (a model_XXXXX.pt in your log dir)")
    if args.sample and not args.prompt:
        parser.error("--sample needs a non-empty --prompt")
    if hasattr(args, "gguf_type") and not hasattr(args, "export_gguf"):
        parser.error("--gguf-type goes with --export-gguf FILE")
    if args.rewind and not hasattr(args, "resume"):
        parser.error("--rewind goes with --resume PATH: the older checkpoint to go back to")
    preset = getattr(args, "preset", "gpt2")
    values = dict(PRESETS[preset], preset=preset)
    values.update(given_fields(args))
    cfg = TrainConfig(**values)
    check_config_ranges(cfg, vars(args))
    return cfg, args


def check_config_ranges(cfg, flags=None):
    """Every numeric field of cfg and flag in `flags` in its range (Range, declared with
    it), before anything is built: fresh, resumed, and the commands' own flags."""
    parser = build_parser()
    defaults = dict(dataclasses.asdict(TrainConfig()), **PRESETS[cfg.preset])
    check_ranges(dict(flags or {}, **dataclasses.asdict(cfg)), parser.ranges,
                 {name: defaults.get(name, parser.get_default(name)) for name in parser.ranges})


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
                     "dtype", "dist_timeout", "fused_ce", "tensorboard", "wandb", "wandb_run"}


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
    resumed = dataclasses.replace(cfg, **{k: v for k, v in given.items()
                                          if k in RESUME_MAY_CHANGE})
    check_config_ranges(resumed)  # the checkpoint's values too: it may be older than a range
    return resumed


def check_config(cfg, world_size=1, device_type=None):
    """What no single flag's range says: how the flags fit together, and on this device.
    A valid configuration that is probably not what the user meant gets a warning line."""
    T = cfg.seq_len
    if T > cfg.block_size:
        raise UserError(f"--seq-len {T} is longer than the model's block size {cfg.block_size}; "
                        f"use --seq-len {cfg.block_size} or less (or a larger --block-size)")
    if cfg.batch_size != "auto":  # else train() checks it once fit_micro_batch has chosen it
        check_batch(cfg, world_size)
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}")
    if cfg.fused_ce and device_type not in (None, "cuda"):
        raise UserError(f"--fused-ce runs a Triton kernel on a CUDA GPU, not on {device_type}: "
                        "drop --fused-ce")
    check_packages(cfg)
    if launched_rank0():
        for line in config_warnings(cfg):
            print(f"warning: {line}")


def check_batch(cfg, world_size=1):
    """The micro-batch fits the total batch a whole number of times on every rank."""
    B, T = cfg.batch_size, cfg.seq_len
    if cfg.total_batch_size % (B * T * world_size):
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not divisible by "
                        f"B*T*world_size = {B}*{T}*{world_size} = {B * T * world_size}")


def config_warnings(cfg):
    """Lines about a valid configuration that trains, but likely not as meant."""
    if cfg.warmup_steps >= cfg.max_steps:
        yield (f"--warmup-steps {cfg.warmup_steps} is not below --max-steps {cfg.max_steps}: "
               "the run ends before the learning rate reaches --max-lr")
    for name, what in (("eval_every", "validation runs only at the start and the end"),
                       ("hellaswag_every", "HellaSwag runs only at the start and the end"),
                       ("sample_every", "samples are printed only at the end"),
                       ("checkpoint_every", "the only checkpoint is the last")):
        if getattr(cfg, name) > cfg.max_steps:
            yield (f"--{name.replace('_', '-')} {getattr(cfg, name)} is longer than the run "
                   f"(--max-steps {cfg.max_steps}): {what}")


def val_windows(cfg, available):
    """How many val windows of B x T tokens one evaluation reads: --val-tokens' worth, or
    the whole val split when it holds fewer (said once, on rank 0)."""
    wanted = max(1, cfg.val_tokens // (cfg.batch_size * cfg.seq_len))
    if wanted > available and cfg.eval_every and launched_rank0():
        print(f"warning: the val split holds {available * cfg.batch_size * cfg.seq_len:,} "
              f"tokens in windows of {cfg.batch_size} x {cfg.seq_len}, fewer than --val-tokens "
              f"{cfg.val_tokens:,}: each evaluation reads all of them")
    return min(wanted, available)


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
