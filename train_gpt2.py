"""
Reproduce GPT-2 (124M) from scratch: the model, the data loader, and the training loop.

    python train_gpt2.py --preset shakespeare            # a few minutes on a laptop CPU
    python fineweb.py                                     # 10B tokens of FineWeb-Edu into shards
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # GPT-2 (124M), about an hour on 8 GPUs
    python train_gpt2.py --resume                         # continue the newest checkpoint in --log-dir
    python train_gpt2.py --sample --checkpoint log/model_19073.pt --prompt "Hello,"
    python train_gpt2.py --export-hf out/ --checkpoint log/model_19073.pt
    python train_gpt2.py --export-gguf gpt2.gguf --checkpoint log/model_19073.pt   # llama.cpp
    python train_gpt2.py --plot log                       # log/loss.png from log/log.txt

The file reads top to bottom in the lecture's order: the GPT model, the data loader, DDP,
the learning-rate schedule, the run's set-up, the loop, then main(). The hyperparameters are
config.py's TrainConfig; checkpoint files, the plot and the shared helpers live in the
modules imported below, each named for what it holds. Importing it runs nothing.
"""

import contextlib
import dataclasses
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fineweb
import hellaswag
from checkpoint import (CONV1D_WEIGHTS, PretrainedError, export, load_pretrained, new_run_id,
                        open_log_dir, read_run_checkpoint, rng_state, run_failure,
                        save_checkpoint, set_rng_state)
from common import Interrupted, StepClock, StopRequest, UserError, format_duration, run_cli
from config import (check_batch, check_config, parse_config, preset_micro_batch, resume_from,
                    val_windows)
from device import (autocast, fit_micro_batch, load_scaler, peak_flops, resolve_device,
                    run_policy, use_huge_pages)
from fused_ce import fused_loss_for_model
from plot import save_plot
from tokenizer import GPT2_VOCAB, get_encoding
from tracking import RunLog

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# The model: GPT-2, with GPT-2's own parameter names so OpenAI's weights load by a
# transpose and a copy.


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per layer, so
    that sampling runs the new token alone through the network instead of the whole
    sequence again."""

    def __init__(self, config, batch_size, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # how many positions are filled

    def update(self, layer, k, v):
        # k, v: (B, nh, T, hs) of the new tokens; returns those of every token so far
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # adds into the residual stream: see GPT
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.size()  # batch size, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # a prefill (T > 1) starts an empty cache, so is_causal's mask is right for it;
            # a single new token may look at every cached position, so no mask at all
            assert T == 1 or cache.pos == 0
            k, v = cache.update(layer, k, v)  # (B, nh, pos+T, hs)
        y = self.attend(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)

    def attend(self, q, k, v, is_causal):
        # flash attention where the device has it: the (T, T) matrix of scores is never
        # written to memory (bench.py's ladder compares it with the explicit softmax)
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        # pre-norm: the residual stream x itself is never normalized, so gradients flow
        # straight from the loss to the embeddings
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config, fused_ce=False):
        super().__init__()
        self.config = config
        self.fused_loss = fused_loss_for_model() if fused_ce else None  # fused_ce.py
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying, as GPT-2: the token embedding and output projection are one 38M matrix
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # c_proj of attention and MLP add into the residual stream, 2 per layer:
                # GPT-2 scales them by 1/sqrt(2 * n_layer) so the stream's variance does
                # not grow with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        # idx: (B, T) token ids; targets: (B, T) the next token at each position
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        assert start + T <= self.config.block_size, \
            f"sequence of {start + T} tokens, block size is only {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, n_embd)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if self.fused_loss is not None and targets is not None:  # the loss alone
            return None, self.fused_loss(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None,
                 use_cache=True):
        """Continue the token ids idx (B, T) by max_new_tokens; returns (B, T + new).

        With the cache, the prompt goes through the network once (prefill), then each new
        token alone; at block_size the cache restarts from the newest half of the
        sequence. use_cache=False is the plain loop: the whole sequence (its last
        block_size tokens) for every new token. Both give the same tokens while the
        sequence fits. temperature 0 is greedy decoding."""
        was_training = self.training
        self.eval()
        block_size = self.config.block_size
        dtype = self.transformer.wte.weight.dtype
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos == block_size:
                window = idx[:, -(block_size // 2 if cache is not None else block_size):]
                cache = KVCache(self.config, idx.size(0), idx.device, dtype)
                logits, _ = self(window, cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            # the padded rows of a 50304 vocabulary are never real tokens
            logits = logits[:, -1, :GPT2_VOCAB].float()  # (B, vocab)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                # a draw among the top_k likeliest tokens (huggingface's pipeline default is
                # 50; None for all), which is fast too: multinomial over 50,257 takes 1 ms a row
                top_k = min(top_k or logits.size(-1), logits.size(-1))
                logits, candidates = torch.topk(logits, top_k)  # (B, top_k) each
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
                next_id = torch.gather(candidates, -1, next_id)  # the token ids
            idx = torch.cat((idx, next_id), dim=1)
        self.train(was_training)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from Hugging Face: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a
        directory that transformers saved."""
        from transformers import GPT2LMHeadModel
        hf = load_pretrained(GPT2LMHeadModel, name_or_path, "give a saved model's directory")
        c = hf.config
        model = GPT(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                              n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf.state_dict().items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
        if set(sd) != set(sd_hf):
            raise PretrainedError(f"{name_or_path} is not GPT-2: its keys differ from GPT-2's "
                                  f"{sorted(set(sd) ^ set(sd_hf))[:5]}; give a GPT-2 model")
        for k, w in sd_hf.items():
            # OpenAI's checkpoint has "Conv1D" modules: Linears with their weights transposed
            if k.endswith(CONV1D_WEIGHTS):
                w = w.t()
            if w.shape != sd[k].shape:
                raise PretrainedError(f"{name_or_path}: {k} has shape {tuple(w.shape)}, GPT-2's "
                                      f"is {tuple(sd[k].shape)}; give a GPT-2 model")
            with torch.no_grad():
                sd[k].copy_(w)
        return model

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """A model trained by this script, from its model_XXXXX.pt or a log dir's newest."""
        ckpt = read_run_checkpoint(path, device)
        model = cls(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device)

    def configure_optimizers(self, weight_decay, learning_rate, device_type, verbose=False,
                             fused=None):
        # weight decay on the matrices of matmuls and embeddings (2-D), none on biases and
        # layernorm gains: decaying those only fights the normalization
        params = [p for p in self.parameters() if p.requires_grad]  # the tied matrix once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if verbose:
            print(f"decayed tensors: {len(decay)}, {sum(p.numel() for p in decay):,} parameters; "
                  f"non-decayed: {len(no_decay)}, {sum(p.numel() for p in no_decay):,}")
        # fused AdamW: one kernel for all parameters instead of a loop of small ones
        # (CUDA, and CPUs since torch 2.4)
        fused = device_type in ("cuda", "cpu") if fused is None else fused
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def num_params(model):
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def flops_per_token(config, T):
    # training FLOPs per token, PaLM's appendix B: 6N for the matmuls with the weights
    # (forward 2N, backward 4N) plus 12 * L * H * Q * T for attention's QK^T and AV
    N = (config.vocab_size * config.n_embd  # wte = lm_head, counted once; wpe is a lookup
         + config.n_layer * 12 * config.n_embd ** 2)  # c_attn 3C^2, c_proj C^2, MLP 8C^2
    Q = config.n_embd // config.n_head
    return 6 * N + 12 * config.n_layer * config.n_head * Q * T


# -----------------------------------------------------------------------------
# Data: shards of uint16 tokens (fineweb.py writes them), read through a memory map so
# a 100M-token shard costs nothing until a window of it is used.


class DataLoaderLite:
    """Hands out (x, y) batches of B rows of T tokens from the shards of one split.

    A window is B*T+1 consecutive tokens of a shard (the +1 is the target of the last
    position). The windows of all shards form one list per epoch; each rank takes a
    disjoint stride of it: at each step, rank r reads entry consumed + r, and consumed
    advances by world_size. Shuffled, an epoch permutes the shard order and the windows
    inside each shard from (seed, epoch), identically on every rank; not shuffled, it is
    build-nanogpt's order, shard by shard, start to end. The last world_size - 1 windows
    of an epoch or fewer go unused when the count does not divide. With vocab_size, a
    token id past it stops the run with the shard's name."""

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, shuffle=False, seed=0,
                 vocab_size=None, pin_memory=False):
        self.B, self.T, self.pin_memory = B, T, pin_memory
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.vocab_size = shuffle, seed, vocab_size
        self.paths = fineweb.list_shards(data_dir, split)
        if not self.paths:
            raise UserError(f"no {split} shards (PREFIX_{split}_NNNNNN.bin or .npy) in {data_dir}")
        self.shards = [fineweb.load_shard(p) for p in self.paths]
        # window i of a shard covers tokens [i*B*T, (i+1)*B*T + 1); a shard shorter than a
        # window (fineweb's last shard holds the remainder), an empty one included, adds none
        counts = [max(0, (len(s) - 1) // (B * T)) for s in self.shards]
        if sum(counts) < world_size:
            raise UserError(f"the {split} shards in {data_dir} hold {sum(counts)} windows of "
                            f"B*T+1 = {B * T + 1} tokens, and each of {world_size} ranks needs "
                            "one: use a smaller --batch-size/--seq-len, or more data")
        self.counts, self.epoch, self.consumed = counts, 0, 0
        self._order()

    def __len__(self):
        return sum(self.counts)  # windows per epoch

    def _order(self):
        # the epoch's (shard, window) list as two arrays: at 10B tokens it is 150k windows
        shard_order = np.arange(len(self.shards))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            shard_order = rng.permutation(shard_order)
        shards, windows = [], []
        for s in shard_order:
            w = np.arange(self.counts[s])
            shards.append(np.full_like(w, s))
            windows.append(rng.permutation(w) if self.shuffle else w)
        self.order_shard = np.concatenate(shards)
        self.order_window = np.concatenate(windows)

    def window(self, i):
        """Entry i of this epoch's order as (x, y), each (B, T) int64 on the CPU."""
        B, T = self.B, self.T
        start = int(self.order_window[i]) * B * T
        # the memmap slice reads just these B*T+1 tokens; int64 only for them
        shard = self.order_shard[i]
        buf = torch.from_numpy(self.shards[shard][start:start + B * T + 1].astype(np.int64))
        if self.vocab_size is not None and int(buf.max()) >= self.vocab_size:
            raise UserError(f"{self.paths[shard]} holds token id {int(buf.max())}: use a "
                            f"--vocab-size above it (now {self.vocab_size}; GPT-2's: 50304)")
        buf = buf.pin_memory() if self.pin_memory else buf  # so .to(cuda) need not wait
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def next_batch(self):
        if self.consumed + self.world_size > len(self):
            self.epoch, self.consumed = self.epoch + 1, 0
            self._order()
        x, y = self.window(self.consumed + self.rank)
        self.consumed += self.world_size
        return x, y

    def state_dict(self):
        # the position is global (windows used by all ranks), so a resume may even
        # change the number of ranks
        return {"epoch": self.epoch, "consumed": self.consumed, "B": self.B, "T": self.T,
                "shuffle": self.shuffle, "seed": self.seed, "windows": len(self)}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("B", "T", "shuffle", "seed", "windows"):
            if state[key] != mine[key]:
                raise UserError(f"the checkpoint's data loader had {key}={state[key]}, this "
                                f"run has {mine[key]}; resume with the run's settings and data")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self._order()


# -----------------------------------------------------------------------------
# Distributed data parallel (DDP): torchrun starts one process per GPU, each with its rank


@dataclass
class DistEnv:
    """Where this process stands: its rank among world_size processes, and its device."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    device_type: str = "cpu"

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0  # this process logs, prints and checkpoints

    def print0(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def setup_distributed(device, timeout_minutes):
    """Reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU. A plain
    `python train_gpt2.py` is a world of one."""
    if "RANK" not in os.environ:
        return DistEnv(device=device[0], device_type=device[1])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    name, device_type = device
    if device_type == "cuda":
        name = f"cuda:{local_rank}"
        torch.cuda.set_device(name)
    elif device_type == "mps":
        raise UserError("distributed training needs CUDA (nccl) or the CPU (gloo), not mps")
    # a collective that waits longer than the timeout raises instead of hanging forever
    # when another rank died (on NCCL also set TORCH_NCCL_ASYNC_ERROR_HANDLING=1)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(rank, local_rank, world_size, name, device_type)


def all_reduce_sum(tensor, env):
    # SUM then divide where a mean is wanted: gloo has no ReduceOp.AVG
    if env.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor

# -----------------------------------------------------------------------------
# The learning rate: GPT-3's schedule


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    # linear warmup, then a cosine from max_lr down to min_lr at max_steps
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)

# -----------------------------------------------------------------------------
# The run's set-up: the data, the model, its optimizer, and where a resume starts


@dataclass
class Run:
    """What the training loop works with; start_run() builds it."""
    cfg: object  # config.TrainConfig
    env: DistEnv
    raw_model: GPT  # the plain module, for evaluation, sampling and state_dict()
    model: nn.Module  # what trains: raw_model compiled and/or wrapped in DDP
    eval_model: nn.Module  # compiled, not DDP: the val loss has training's shapes
    optimizer: torch.optim.Optimizer
    train_loader: DataLoaderLite
    val_loader: DataLoaderLite
    val_windows: int
    grad_accum_steps: int
    dtype: str  # "bf16", "fp16" or "fp32"
    scaler: torch.amp.GradScaler  # fp16's loss scaling; disabled (a no-op) otherwise
    hella_examples: list
    enc: object
    log: RunLog  # log.txt, and TensorBoard and W&B where asked (tracking.py)
    start_step: int = 0
    val_loss: float = None
    start_evaluated: bool = False  # the evaluations of start_step ran before its checkpoint
    skipped_steps: int = 0  # steps the GradScaler skipped for an inf or NaN gradient
    run_id: str = dataclasses.field(default_factory=new_run_id)  # a resume keeps its run's


def build_model(cfg, env, policy, verbose=False):
    """A fresh GPT of cfg's shape on env's device -> (it, it compiled or not, its AdamW):
    what start_run trains, and what --batch-size auto's probe tries."""
    raw_model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                              n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd),
                    fused_ce=cfg.fused_ce).to(env.device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, env.device_type,
                                               verbose=verbose, fused=policy.fused_adamw)
    return raw_model, torch.compile(raw_model) if policy.compile else raw_model, optimizer


def start_run(cfg, env, policy, ckpt):
    """Everything the loop needs, from scratch or from the checkpoint `ckpt`."""
    barrier = dist.barrier if env.ddp else None  # waits for every rank
    fineweb.prepare_run_data(cfg, env.master, barrier)
    torch.manual_seed(cfg.seed)  # every device's generator: the same weights on every rank
    if env.device_type == "cuda":
        # TF32 for fp32 matmuls (10 bits of mantissa instead of 23): the lecture's 3x
        torch.set_float32_matmul_precision("high")
    B, T = cfg.batch_size, cfg.seq_len
    grad_accum_steps = cfg.total_batch_size // (B * T * env.world_size)
    env.print0(f"total batch {cfg.total_batch_size:,} tokens = {B} x {T} x {env.world_size} "
               f"ranks x {grad_accum_steps} micro steps")
    train_loader = DataLoaderLite(cfg.data_dir, "train", B, T, env.rank, env.world_size,
                                  shuffle=cfg.shuffle, seed=cfg.seed, vocab_size=cfg.vocab_size,
                                  pin_memory=policy.pin_memory)
    val_loader = DataLoaderLite(cfg.data_dir, "val", B, T, env.rank, env.world_size,
                                vocab_size=cfg.vocab_size)

    raw_model, eval_model, optimizer = build_model(cfg, env, policy, verbose=env.master)
    env.print0(f"model: {num_params(raw_model):,} parameters")
    env.print0(f"device {env.device}: {policy.describe()}")
    model = eval_model
    if env.ddp:
        model = DDP(model, device_ids=[env.local_rank] if env.device_type == "cuda" else None)
    scaler = torch.amp.GradScaler(env.device_type, enabled=policy.grad_scaler)
    run = Run(cfg, env, raw_model, model, eval_model, optimizer, train_loader, val_loader,
              val_windows(cfg, len(val_loader)), grad_accum_steps, policy.dtype, scaler,
              hellaswag.load_for_training(cfg, env.master, barrier), get_encoding(),
              RunLog(cfg.log_dir, env.master))
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        train_loader.load_state_dict(ckpt["train_loader"])
        set_rng_state(ckpt["rng"], env.device_type, env.rank)
        run.start_step, run.val_loss, run.run_id = ckpt["step"], ckpt["val_loss"], ckpt["run_id"]
        run.start_evaluated = ckpt.get("evaluated", True)
        run.skipped_steps = load_scaler(scaler, ckpt.get("scaler"))
        run.log.trim(run.start_step, keep_evaluations=run.start_evaluated)
    return run

# -----------------------------------------------------------------------------
# The training loop, and what it does along the way


@torch.no_grad()
def evaluate_loss(model, loader, n_windows, env, dtype=None):
    """Mean loss over the first n_windows windows of the val split. The windows are the
    same for any number of ranks (each takes a stride), so val losses compare across runs."""
    model.eval()
    total = torch.zeros(2, device=env.device)  # sum of window losses, number of windows
    for i in range(env.rank, n_windows, env.world_size):
        x, y = loader.window(i)
        with autocast(env.device_type, dtype):
            _, loss = model(x.to(env.device), y.to(env.device))
        total[0] += loss.float()
        total[1] += 1
    model.train()
    total = all_reduce_sum(total, env)
    return (total[0] / total[1]).item()


def evaluate_hellaswag(model, examples, env, dtype, enc):
    """acc_norm over the examples, each rank scoring its share. -> (acc_norm, count)"""
    # the uncompiled module: eval shapes vary by example, and must not recompile
    n, _, correct_norm = hellaswag.evaluate(
        lambda idx: model(idx)[0], examples, device=env.device,
        autocast=lambda: autocast(env.device_type, dtype), rank=env.rank,
        world_size=env.world_size, enc=enc, block_size=model.config.block_size)
    counts = all_reduce_sum(torch.tensor([n, correct_norm], device=env.device), env)
    return counts[1].item() / max(1, counts[0].item()), counts[0].item()


def print_samples(model, enc, prompt, num_samples, max_new_tokens, device, seed, top_k=50,
                  temperature=1.0):
    tokens = torch.tensor(enc.encode_ordinary(prompt), dtype=torch.long, device=device)
    idx = tokens.unsqueeze(0).repeat(num_samples, 1)
    # a generator of its own, so sampling never moves the training's random state
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         generator=gen)
    for i in range(num_samples):
        print(f"sample {i}: {enc.decode(out[i].tolist())}")


def train_step(run, step):
    """One optimizer step over total_batch_size tokens: the micro steps, then clip, set
    the learning rate, update. -> (mean loss as a tensor, gradient norm, lr)."""
    cfg, env, model, optimizer = run.cfg, run.env, run.model, run.optimizer
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=env.device)
    for micro_step in range(run.grad_accum_steps):
        x, y = run.train_loader.next_batch()
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        # DDP all-reduces gradients in backward(); in all but the last micro step there
        # is nothing to average yet, so skip the communication
        sync = not env.ddp or micro_step == run.grad_accum_steps - 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast(env.device_type, run.dtype):
                _, loss = model(x, y)
            # gradients add up over micro steps, but the objective is the MEAN over
            # the whole batch: divide each micro batch's mean loss by their number
            loss = loss / run.grad_accum_steps
            loss_accum += loss.detach()
            # fp16: the loss times the loss scale, so small gradients don't round to zero
            run.scaler.scale(loss).backward()
    loss_accum = all_reduce_sum(loss_accum, env) / env.world_size
    run.scaler.unscale_(optimizer)  # the clip and the logged norm see the true gradients
    norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip or math.inf)
    lr = get_lr(step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps,
                cfg.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scale = run.scaler.get_scale()
    run.scaler.step(optimizer)  # no update where a gradient is inf or NaN, and then
    run.scaler.update()  # a halved scale: so a skipped step is one whose scale fell
    run.skipped_steps += run.scaler.get_scale() < scale
    return loss_accum, norm, lr


def save_run(run, step, evaluated=True):
    """A checkpoint of the state after `step` optimizer steps (rank 0 writes it); every
    rank must call this. evaluated: the evaluations of `step` are in log.txt already."""
    rng = rng_state(run.env.device_type, run.env.world_size)  # a collective on CUDA + DDP
    if not run.env.master:
        return None
    ckpt = {"model": run.raw_model.state_dict(),
            "model_config": dataclasses.asdict(run.raw_model.config),
            "config": dataclasses.asdict(run.cfg), "optimizer": run.optimizer.state_dict(),
            "val_loss": run.val_loss, "train_loader": run.train_loader.state_dict(),
            "rng": rng, "evaluated": evaluated, "run_id": run.run_id,
            "scaler": dict(run.scaler.state_dict(), skipped_steps=run.skipped_steps)}
    path = save_checkpoint(ckpt, run.cfg.log_dir, step, run.cfg.keep_checkpoints)
    print(f"saved {path}")
    return path


def throughput(run, seconds_per_step):
    """-> ('N tok/s | MFU x%', the same as {"tokens_per_sec", "mfu"}): tokens over all
    ranks, FLOPs against the cards' bf16 peak (no MFU where that peak is not known)."""
    tokens_per_sec = run.cfg.total_batch_size / seconds_per_step
    peak = peak_flops(run.env.device_type)
    flops = flops_per_token(run.raw_model.config, run.cfg.seq_len) * tokens_per_sec
    mfu = flops / (peak * run.env.world_size) if peak else None
    text = f"{tokens_per_sec:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if peak else "")
    return text, {"tokens_per_sec": tokens_per_sec, "mfu": mfu}


def record(run, step, stream, value, text, **scalars):
    """A measurement: printed, and a line of log.txt with the scalars beside it (rank 0)."""
    run.env.print0(f"step {step:5d} | {text}")
    run.log.write(step, stream, value, **scalars)


def log_step(run, step, loss, norm, lr, dt, clock):
    eta, scaling = format_duration(clock.per_step(dt) * (run.cfg.max_steps - step - 1)), ""
    if run.scaler.is_enabled():  # fp16: the loss scale, and the steps skipped so far
        scaling = f" | scale {run.scaler.get_scale():g}, {run.skipped_steps} skipped"
        run.log.write(step, "scale", run.scaler.get_scale())
        run.log.write(step, "skipped", run.skipped_steps)
    text, measured = throughput(run, dt)
    record(run, step, "train", loss, f"loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f}"
           f"{scaling} | {1000 * dt:.1f} ms | {text} | {clock.elapsed()} elapsed, "
           f"ETA {eta}", lr=lr, grad_norm=norm, **measured)


def stop_agreed(stop, env):
    """The signal any rank got (0: none): all stop after one step, or some wait forever."""
    flag = torch.tensor([stop.signum], device=env.device)
    if env.ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def is_due(n, step, last):
    return n > 0 and (step % n == 0 or last)


def train_loop(run):
    """The lecture's loop: evaluate now and then, take optimizer steps, log each one."""
    cfg, env = run.cfg, run.env
    clock = StepClock(run.start_step, cfg.max_steps)
    first_val = None
    with StopRequest() as stop, run.log.tracking(cfg, run.run_id, run.start_step):
        for step in range(run.start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            # evaluations see the model after `step` updates, outside the step's clock; a
            # resumed run does not repeat those its checkpoint already logged
            fresh = step > run.start_step or not run.start_evaluated
            if fresh and is_due(cfg.eval_every, step, last):
                run.val_loss = evaluate_loss(run.eval_model, run.val_loader, run.val_windows,
                                             env, run.dtype)
                first_val = run.val_loss if first_val is None else first_val
                record(run, step, "val", run.val_loss, f"val loss {run.val_loss:.4f}")
            if fresh and run.hella_examples and is_due(cfg.hellaswag_every, step, last):
                acc, n = evaluate_hellaswag(run.raw_model, run.hella_examples, env, run.dtype,
                                            run.enc)
                record(run, step, "hella", acc, f"HellaSwag acc_norm {acc:.4f} ({n} examples)")
            if env.master and fresh and step > 0 and is_due(cfg.sample_every, step, last):
                print_samples(run.raw_model, run.enc, "Hello, I'm a language model,", 4, 32,
                              env.device, seed=42 + step)
            if fresh and step > 0 and (last or is_due(cfg.checkpoint_every, step, False)):
                save_run(run, step)
            if last:
                break

            t0, skipped = time.time(), run.skipped_steps
            loss, norm, lr = train_step(run, step)
            if env.device_type == "cuda":
                torch.cuda.synchronize()  # wait for the GPU before reading the clock
            dt, loss = time.time() - t0, loss.item()
            if not math.isfinite(loss) and run.skipped_steps == skipped:  # no scaler saved it
                raise UserError(f"the loss is {loss} at step {step}: training diverged; the "
                                "newest checkpoint is the last good one (lower --max-lr and "
                                "--resume)")
            clock.add(dt)
            log_step(run, step, loss, norm, lr, dt, clock)
            if signum := stop_agreed(stop, env):
                # the state after step + 1 updates, saved before that step's evaluations
                path = save_run(run, step + 1, evaluated=False)
                raise Interrupted(f"interrupted at step {step + 1}: saved {path}; continue "
                                  "with --resume", signum)

    if clock.steps:
        env.print0(f"average over {clock.steps} timed steps: {clock.per_step(0) * 1000:.1f} "
                   f"ms/step, {throughput(run, clock.per_step(0))[0].replace(' |', ',')}")
    if first_val is not None:
        env.print0(f"val loss: {first_val:.4f} at the first evaluation, {run.val_loss:.4f} "
                   "at the end")
    env.print0(f"done in {clock.elapsed()}")

# -----------------------------------------------------------------------------
# A training run, in each process that torchrun starts: set up, then the loop; and main:
# train, resume, or one of the commands that use a checkpoint


def train(cfg, ckpt=None):
    """A training run in this process (one rank of it under torchrun): set up, resume
    from the checkpoint dict `ckpt` if given, run the loop."""
    device = resolve_device(cfg.device)  # before any process group, so errors are local
    if device[1] == "cpu":
        use_huge_pages()  # before the first tensor: PyTorch reads it then
    env = setup_distributed(device, cfg.dist_timeout)
    lock = None
    try:
        policy = run_policy(env.device_type, cfg.dtype, cfg.compile)
        cfg.dtype = policy.dtype  # the checkpoint keeps what the run trains in
        check_config(cfg, env.world_size, env.device_type)  # before auto's probe builds a model
        if cfg.batch_size == "auto":  # the largest micro-batch that fits (device.py)
            cfg.batch_size, line = fit_micro_batch(
                lambda: build_model(cfg, env, policy)[1:], preset_micro_batch(cfg.preset),
                cfg.seq_len, cfg.total_batch_size, env.device_type, env.device, cfg.dtype,
                env.world_size)
            env.print0(line)
            check_batch(cfg, env.world_size)
        if env.master:
            lock = open_log_dir(cfg.log_dir, ckpt["run_id"] if ckpt else None)
        run = start_run(cfg, env, policy, ckpt)
        if run.start_step >= cfg.max_steps and run.start_evaluated:
            env.print0(f"the run is complete: step {run.start_step} of --max-steps {cfg.max_steps}")
        train_loop(run)
    except RuntimeError as e:  # out of memory, or a collective whose peer rank died
        raise run_failure(e, cfg.log_dir, env.ddp, cfg.batch_size, cfg.seq_len) or e
    finally:
        if lock is not None:
            lock.release()
        if env.ddp:
            dist.destroy_process_group()


def main(argv=None):
    cfg, args = parse_config(argv)
    if args.exports:  # --export-hf, --export-gguf
        print(export(GPT.from_checkpoint(args.checkpoint), args))
    elif args.sample:
        device = resolve_device(cfg.device)[0]
        print_samples(GPT.from_checkpoint(args.checkpoint, device), get_encoding(), args.prompt,
                      args.num_samples, args.max_new_tokens, device, seed=cfg.seed,
                      top_k=args.top_k, temperature=args.temperature)
    elif getattr(args, "plot", None):
        save_plot(args.plot, getattr(args, "preset", None))
    elif getattr(args, "resume", None):
        train(*resume_from(cfg, args, get_lr))
    else:
        train(cfg)


if __name__ == "__main__":
    status = run_cli(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without Python's shutdown: a gloo thread that still holds a
        # finished collective's tensors can abort the interpreter as it exits (README, Errata)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)
    sys.exit(status)
