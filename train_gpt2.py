"""
Reproduce GPT-2 (124M) from scratch: the model, the data loader, and the training loop.

    python train_gpt2.py --preset shakespeare            # a few minutes on a laptop CPU
    python fineweb.py                                     # 10B tokens of FineWeb-Edu into shards
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # GPT-2 (124M), about an hour on 8 GPUs

Other commands of the same script:

    python train_gpt2.py --resume                         # continue the newest checkpoint in --log-dir
    python train_gpt2.py --sample --checkpoint log/model_19073.pt --prompt "Hello,"
    python train_gpt2.py --export-hf out/ --checkpoint log/model_19073.pt
    python train_gpt2.py --plot log                       # log/loss.png from log/log.txt

The file reads top to bottom: the model, data, helpers, the configuration, then main().
Importing it runs nothing.
"""

import argparse
import contextlib
import dataclasses
import datetime
import glob
import math
import os
import random
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
from tokenizer import get_encoding

GPT2_VOCAB = 50257  # GPT-2's real vocabulary; a model's vocab_size may be padded past it
HERE = os.path.dirname(os.path.abspath(__file__))


class UserError(ValueError):
    """A mistake the user can fix: main() prints its one-line message, no traceback."""


class CheckpointError(UserError):
    pass

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
    sequence again (gpt-fast keeps its cache the same way)."""

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

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (as GPT-2 did): the token embedding and the output projection are
        # one matrix, which saves 38M parameters at 124M
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if module is not self.lm_head and module.out_features == self.config.n_embd:
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
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None,
                 use_cache=True):
        """Continue the token ids idx (B, T) by max_new_tokens; returns (B, T + new).

        With the cache, the prompt goes through the network once (prefill) and then
        each new token alone. When the sequence reaches block_size, the cache drops the
        oldest half and is filled again from the newest half (positions restart, as the
        model knows no position past block_size). use_cache=False recomputes the whole
        sequence, cropped to its last block_size tokens, for every new token: the plain
        loop. Both give the same tokens while the sequence fits in block_size.
        temperature 0 is greedy decoding."""
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
                if top_k is not None:
                    # keep the top_k most likely tokens (huggingface's pipeline default is 50)
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        self.train(was_training)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from Hugging Face: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a
        directory that transformers saved."""
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                           n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
        model = GPT(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf.state_dict().items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
        if set(sd) != set(sd_hf):
            raise ValueError(f"{name_or_path}: keys differ from GPT-2's: "
                             f"{sorted(set(sd) ^ set(sd_hf))[:5]}")
        for k, w in sd_hf.items():
            # OpenAI's checkpoint uses a "Conv1D" module, a Linear with its weight stored
            # transposed
            if k.endswith(CONV1D_WEIGHTS):
                w = w.t()
            if w.shape != sd[k].shape:
                raise ValueError(f"{name_or_path}: {k} has shape {tuple(w.shape)}, "
                                 f"expected {tuple(sd[k].shape)}")
            with torch.no_grad():
                sd[k].copy_(w)
        return model

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
        # (CUDA, and CPUs since torch 2.4: about 6% of a shakespeare step, bench.py ladder)
        fused = device_type in ("cuda", "cpu") if fused is None else fused
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                 fused=fused)


CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def num_params(model):
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def flops_per_token(config, T):
    # training FLOPs per token, PaLM's appendix B: 6N for the matmuls with the weights
    # (forward 2N, backward 4N) plus 12 * L * H * Q * T for attention's QK^T and AV
    N = (config.vocab_size * config.n_embd  # wte = lm_head, counted once; wpe is a lookup
         + config.n_layer * 12 * config.n_embd ** 2)  # c_attn 3C^2, c_proj C^2, MLP 8C^2
    Q = config.n_embd // config.n_head
    return 6 * N + 12 * config.n_layer * config.n_head * Q * T


# dense bf16 peak FLOP/s of the accelerators we know, from NVIDIA's data sheets
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def peak_flops(device_type):
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_FLOPS:
        if all(word in name for word in key.split()):
            return flops
    return None  # unknown card: print tokens/s, leave MFU out rather than guess

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
    of an epoch or fewer go unused when the count does not divide."""

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, shuffle=False, seed=0):
        self.B, self.T = B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        paths = fineweb.list_shards(data_dir, split)
        if not paths:
            raise UserError(f"no {split} shards (*_{split}_*.bin or .npy) in {data_dir}")
        self.shards = [fineweb.load_shard(p) for p in paths]
        # window i of a shard covers tokens [i*B*T, (i+1)*B*T + 1); a shard shorter than a
        # window (fineweb's last shard holds the remainder) adds none
        counts = [(len(s) - 1) // (B * T) for s in self.shards]
        if sum(counts) < world_size:
            raise UserError(f"the {split} shards in {data_dir} hold {sum(counts)} windows of "
                            f"B*T+1 = {B * T + 1} tokens, and each of {world_size} ranks needs "
                            "one: use a smaller --batch-size/--seq-len, or more data")
        self.counts = counts
        self.epoch, self.consumed = 0, 0
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
        buf = torch.from_numpy(self.shards[self.order_shard[i]][start:start + B * T + 1]
                               .astype(np.int64))
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
# Helpers: devices, distributed set-up, the learning rate, evaluation, checkpoints.


def resolve_device(name):
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' -> (device, device_type)."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    device_type = name.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but this torch sees no CUDA GPU; use --device cpu "
                        "(or auto), or install a CUDA build of torch")
    if device_type == "mps" and not (hasattr(torch.backends, "mps")
                                     and torch.backends.mps.is_available()):
        raise UserError("--device mps, but MPS is not available here; use --device cpu")
    return name, device_type


def bf16_native(device_type):
    """Whether the device multiplies bf16 matrices in hardware, so bf16 autocast beats fp32:
    CUDA GPUs from Ampere (A100) on, and x86 CPUs with AVX512-BF16 or AMX. Older GPUs
    (V100, T4) and other CPUs would emulate bf16, slower than fp32."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        # (get_capabilities is newer than some torch we accept: without it, fp32)
        capabilities = getattr(torch.cpu, "get_capabilities", dict)()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def autocast(device_type, bf16=None):
    """The context the forward runs in: bf16 autocast (matmuls in bf16, reductions like the
    loss and softmax in fp32) or plain fp32. bf16=None: bf16 where the device is native."""
    if bf16 is None:
        bf16 = bf16_native(device_type)
    if bf16:
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_huge_pages():
    """Have PyTorch's CPU allocator back tensors of 2 MB and more with 2 MB pages.

    Every training step frees and reallocates the logits (B*T*vocab floats) and their
    gradients. Memory that large comes fresh from the kernel each time, which faults it in
    and zeroes it page by page: with 4 KB pages that was most of a shakespeare step on a
    CPU (bench.py ladder, "huge pages"); 2 MB pages make 512 times fewer faults. This is
    PyTorch's own switch (its CPU tuning guide: THP_MEM_ALLOC_ENABLE=1), read once, at the
    first CPU allocation, so call this before any tensor exists. A value already set in
    the environment wins. Linux only; without transparent huge pages it changes nothing.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@dataclass
class Dist:
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
        return self.rank == 0  # this process logs, samples-prints and checkpoints


def setup_distributed(device, timeout_minutes):
    """Reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU. A plain
    `python train_gpt2.py` is a world of one."""
    if "RANK" not in os.environ:
        return Dist(device=device[0], device_type=device[1])
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
    return Dist(rank, local_rank, world_size, name, device_type)


def all_reduce_sum(tensor, d):
    # SUM then divide where a mean is wanted: gloo has no ReduceOp.AVG
    if d.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    # linear warmup, then a cosine from max_lr down to min_lr at max_steps
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


@torch.no_grad()
def evaluate_loss(model, loader, n_windows, d, bf16=None):
    """Mean loss over the first n_windows windows of the val split. The windows are the
    same for any number of ranks (each takes a stride), so val losses compare across runs."""
    model.eval()
    total = torch.zeros(2, device=d.device)  # sum of window losses, number of windows
    for i in range(d.rank, n_windows, d.world_size):
        x, y = loader.window(i)
        with autocast(d.device_type, bf16):
            _, loss = model(x.to(d.device), y.to(d.device))
        total[0] += loss.float()
        total[1] += 1
    model.train()
    total = all_reduce_sum(total, d)
    return (total[0] / total[1]).item()


def list_checkpoints(log_dir):
    # only complete ones: a save in progress is named .model_XXXXX.pt.tmp
    return sorted(glob.glob(os.path.join(log_dir, "model_[0-9]*.pt")))


CHECKPOINT_KIND = "train_gpt2 checkpoint"


def read_checkpoint(path, device="cpu", mmap=False):
    """torch.load with weights_only=True: tensors and plain data only, so a file cannot
    run code when it is opened. mmap=True maps the tensors instead of reading them, for a
    look at the plain data. Raises CheckpointError with a one-line reason."""
    import pickle
    import zipfile
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the end
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint at all")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, "
                              f"refused by weights_only=True ({str(e).splitlines()[0][:120]})")
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or not a torch file "
                              f"({str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a checkpoint of train_gpt2.py "
                              "(for GPT-2 weights from Hugging Face use GPT.from_pretrained)")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """-> (model, checkpoint dict) for any tool that needs a trained model."""
    ckpt = read_checkpoint(path, device)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def rng_state(d):
    """Every random number generator a step could touch, as tensors and plain data."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    if d.device_type == "cuda":
        # each rank has its own CUDA generator: gather them all into rank 0's checkpoint
        mine = torch.cuda.get_rng_state().to(d.device)
        states = [torch.empty_like(mine) for _ in range(d.world_size)] if d.ddp else [mine]
        if d.ddp:
            dist.all_gather(states, mine)
        state["cuda"] = [s.cpu() for s in states]
    return state


def set_rng_state(state, d):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if d.device_type == "cuda" and "cuda" in state and d.rank < len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"][d.rank].cpu())


def export_hf(model, out_dir):
    """Write config.json + model.safetensors that transformers' GPT2LMHeadModel loads, so
    lm-evaluation-harness and every transformers tool can use a model trained here."""
    from safetensors.torch import save_file
    from transformers import GPT2Config
    c = model.config
    vocab = min(c.vocab_size, GPT2_VOCAB)  # cut the padded rows of a 50304 vocabulary
    hf_config = GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd,
                           n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    sd = {}
    for k, w in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight, which transformers ties back
        w = w.detach().float().cpu()
        if k.endswith(CONV1D_WEIGHTS):
            w = w.t()
        if k == "transformer.wte.weight":
            w = w[:vocab]
        sd[k] = w.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def read_log(path):
    """log.txt -> {stream: ([steps], [values])}, streams train, val and hella."""
    streams = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                steps, values = streams.setdefault(parts[1], ([], []))
                steps.append(int(parts[0]))
                values.append(float(parts[2]))
    return streams


def plot_log(log_dir, preset=None):
    """The loss and HellaSwag curves of log_dir/log.txt, with GPT-2's and GPT-3's figures
    as reference lines (the plot play.ipynb draws). preset picks the reference figures;
    None reads it from the newest checkpoint. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    if preset is None:
        found = list_checkpoints(log_dir)
        preset = read_checkpoint(found[-1], mmap=True)["config"]["preset"] if found else "gpt2"
    streams = read_log(os.path.join(log_dir, "log.txt"))
    ref = REFERENCE.get(preset, {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for name, style in (("train", {"alpha": 0.6}), ("val", {"marker": "."})):
        if name in streams:
            ax1.plot(*streams[name], label=f"{name} loss", **style)
    if ref.get("val"):
        ax1.axhline(ref["val"], color="r", ls="--", label=f"OpenAI GPT-2 ({preset}) val loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    if "hella" in streams:
        ax2.plot(*streams["hella"], label="this model")
    for label, key, color in (("GPT-2", "hella_gpt2", "r"), ("GPT-3", "hella_gpt3", "g")):
        if ref.get(key):
            ax2.axhline(ref[key], color=color, ls="--", label=f"{label} checkpoint")
    ax2.set_xlabel("step")
    ax2.set_ylabel("HellaSwag acc_norm")
    if ax2.lines:
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no HellaSwag evaluations", ha="center", transform=ax2.transAxes)
    fig.tight_layout()
    return fig


# Reference figures, as build-nanogpt's play.ipynb draws them: the FineWeb-Edu val loss of
# OpenAI's GPT-2 (124M), and HellaSwag acc_norm of OpenAI's GPT-2 checkpoints and of GPT-3
# (Brown et al. 2020, zero-shot) at the same sizes.
REFERENCE = {
    "gpt2": {"val": 3.2924, "hella_gpt2": 0.294463, "hella_gpt3": 0.337},
    "gpt2-medium": {"hella_gpt2": 0.375224, "hella_gpt3": 0.436},
    "gpt2-large": {"hella_gpt2": 0.431986, "hella_gpt3": 0.510},
    "gpt2-xl": {"hella_gpt2": 0.488946, "hella_gpt3": 0.547},
}
REFERENCE["gpt3-small"] = REFERENCE["gpt2"]  # the same 124M shape

# -----------------------------------------------------------------------------
# Configuration: one dataclass, presets that fill it, and argparse overrides on top.


def opt(default, help):
    # a config field and its --flag's help in one place; build_parser() makes the flags
    return dataclasses.field(default=default, metadata={"help": help})


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
    data_dir: str = opt("edu_fineweb10B", "directory of *_train_*/*_val_* shards (fineweb.py)")
    shuffle: bool = opt(True, "shuffle shards and windows every epoch")
    # 20 steps of 8 x 64 x 1024 tokens, as build-nanogpt evaluated
    val_tokens: int = opt(10_485_760, "tokens of the val split per evaluation")
    # optimization: build-nanogpt's recipe for GPT-2 (124M) on 10B tokens
    batch_size: int = opt(64, "micro batch B: rows per forward pass")
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
    bf16: bool = opt(None, "bf16 autocast (default: on where the device does bf16 in "
                           "hardware: Ampere+ GPUs, CPUs with AVX512-BF16 or AMX)")
    dist_timeout: int = opt(30, "minutes a collective waits for a dead rank before failing")


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
                        checkpoint_every=200, log_dir="log_shakespeare", device="cpu"),
}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # one line instead of argparse's whole usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    p = ArgumentParser(description="Train GPT-2 from scratch, or use a checkpoint.",
                       argument_default=argparse.SUPPRESS)
    flag = p.add_argument
    # one --flag per TrainConfig field; what is not given comes from the preset
    for f in dataclasses.fields(TrainConfig):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.name == "preset":
            flag(name, choices=sorted(PRESETS), help=help)
        elif f.type is bool:
            flag(name, action=argparse.BooleanOptionalAction, help=help)
        else:
            flag(name, type=f.type, help=help)
    # commands other than training
    flag("--resume", nargs="?", const="latest",
         help="continue the newest checkpoint in --log-dir, or the one given")
    flag("--sample", action="store_true", help="sample from --checkpoint and exit")
    flag("--export-hf", metavar="OUT_DIR", help="write --checkpoint as a Hugging Face model")
    flag("--plot", metavar="LOG_DIR", help="draw LOG_DIR/log.txt into LOG_DIR/loss.png")
    flag("--checkpoint", help="checkpoint for --sample and --export-hf")
    flag("--prompt", default="Hello, I'm a language model,", help="text to continue")
    flag("--num-samples", type=int, default=4, help="continuations to sample")
    flag("--max-new-tokens", type=int, default=32, help="tokens per continuation")
    flag("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    flag("--top-k", type=int, default=50, help="sample among the k likeliest tokens")
    return p


def parse_config(argv):
    """-> (TrainConfig, the command-line namespace). Preset first, then flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = getattr(args, "preset", "gpt2")
    values = dict(PRESETS[preset], preset=preset)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in fields})
    return TrainConfig(**values), args

# -----------------------------------------------------------------------------
# The training run


def log_line(log_path, step, stream, value):
    with open(log_path, "a") as f:
        f.write(f"{step} {stream} {value}\n")  # shortest repr that reads back exactly


def trim_log(log_path, step):
    # a resumed run repeats what came after its checkpoint: drop those lines, so the log
    # reads as one run (evaluations at the checkpoint's step ran before it was saved)
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and (int(parts[0]) > step or (int(parts[0]) == step
                                                          and parts[1] == "train")):
            continue
        keep.append(line)
    with fineweb.atomic_write(log_path, "w") as f:
        f.writelines(keep)


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


def prepare_data(cfg, d):
    """Shards for the run; for the shakespeare preset, tokenize input.txt once (cached)."""
    if cfg.preset == "shakespeare" and not cfg.data_dir:
        cfg.data_dir = os.path.join(HERE, "data", "shakespeare")
        if d.master:
            # 2**15 tokens per shard: shard 0 (val) holds about a tenth of the text
            fineweb.tokenize_local([os.path.join(HERE, "input.txt")], cfg.data_dir,
                                   prefix="shakespeare", shard_size=2 ** 15, workers=1)
        if d.ddp:
            dist.barrier()
    if not os.path.isdir(cfg.data_dir) or not fineweb.list_shards(cfg.data_dir, "train"):
        raise UserError(f"no training shards in {cfg.data_dir}/: run `python fineweb.py` to "
                        "make them (FineWeb-Edu, 10B tokens), or try "
                        "`python train_gpt2.py --preset shakespeare`")


def check_config(cfg, d):
    B, T = cfg.batch_size, cfg.seq_len
    if min(B, T, cfg.total_batch_size, cfg.max_steps) <= 0:
        raise UserError("--batch-size, --seq-len, --total-batch-size and --max-steps must be > 0")
    if T > cfg.block_size:
        raise UserError(f"--seq-len {T} is longer than the model's block size {cfg.block_size}; "
                        f"use --seq-len {cfg.block_size} or less (or a larger --block-size)")
    if cfg.total_batch_size % (B * T * d.world_size):
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not divisible by "
                        f"B*T*world_size = {B}*{T}*{d.world_size} = {B * T * d.world_size}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}")


def train(cfg, args):
    device = resolve_device(cfg.device)  # before any process group, so errors are local
    if device[1] == "cpu":
        use_huge_pages()  # before the first tensor: PyTorch reads it then
    d = setup_distributed(device, cfg.dist_timeout)
    try:
        _train(cfg, args, d)
    finally:
        if d.ddp:
            dist.destroy_process_group()
    if d.ddp:
        # Leave without Python's shutdown. A gloo worker thread can still hold the last
        # reference to a finished collective's tensors; when it lets go while the
        # interpreter is shutting down, it cannot take the GIL and the process aborts
        # (SIGABRT after a complete run, about 1 run in 20 on a loaded CPU; its torchrun
        # then fails and the other node's waits 5 minutes at the exit barrier).
        # Everything is saved by now: checkpoints and log.txt are written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _train(cfg, args, d):
    say = print if d.master else (lambda *a, **k: None)
    check_config(cfg, d)
    os.makedirs(cfg.log_dir, exist_ok=True)
    log_path = os.path.join(cfg.log_dir, "log.txt")
    resume = getattr(args, "resume", None)
    ckpt = None
    if resume:
        path = resume
        if resume == "latest":
            found = list_checkpoints(cfg.log_dir)
            if not found:
                raise UserError(f"--resume: no checkpoint in {cfg.log_dir}/; start without "
                                "--resume, or give the checkpoint's path")
            path = found[-1]
        ckpt = read_checkpoint(path, "cpu")
        for key, value in ckpt["model_config"].items():
            if getattr(cfg, key) != value:
                raise UserError(f"{path} has {key}={value} but this run asks for "
                                f"{getattr(cfg, key)}; resume with the checkpoint's model shape")
        say(f"resuming from {path} at step {ckpt['step']}")
    elif list_checkpoints(cfg.log_dir):
        raise UserError(f"{cfg.log_dir}/ already holds checkpoints of a run: continue it with "
                        "--resume, or choose another --log-dir")
    prepare_data(cfg, d)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if d.device_type == "cuda":
        torch.cuda.manual_seed(cfg.seed)
        # TF32 for fp32 matmuls (10 bits of mantissa instead of 23): the lecture's 3x
        torch.set_float32_matmul_precision("high")

    B, T = cfg.batch_size, cfg.seq_len
    grad_accum_steps = cfg.total_batch_size // (B * T * d.world_size)
    say(f"total batch {cfg.total_batch_size:,} tokens = {B} x {T} x {d.world_size} ranks "
        f"x {grad_accum_steps} micro steps")
    train_loader = DataLoaderLite(cfg.data_dir, "train", B, T, d.rank, d.world_size,
                                  shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = DataLoaderLite(cfg.data_dir, "val", B, T, d.rank, d.world_size)
    val_windows = min(max(1, cfg.val_tokens // (B * T)), len(val_loader))

    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                             n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    raw_model = GPT(model_config).to(d.device)  # nanochat's orig_model: eval, save, sample
    say(f"model: {num_params(raw_model):,} parameters")
    use_compile = cfg.compile if cfg.compile is not None else d.device_type == "cuda"
    bf16 = cfg.bf16 if cfg.bf16 is not None else bf16_native(d.device_type)
    say(f"device {d.device}: {'bf16 autocast' if bf16 else 'fp32'}, "
        f"torch.compile {'on' if use_compile else 'off'}")
    model = torch.compile(raw_model) if use_compile else raw_model
    eval_model = model  # same shapes as training, so compiled once more at most
    if d.ddp:
        model = DDP(model, device_ids=[d.local_rank] if d.device_type == "cuda" else None)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, d.device_type,
                                               verbose=d.master)
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    start_step, val_loss = 0, None
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        train_loader.load_state_dict(ckpt["train_loader"])
        set_rng_state(ckpt["rng"], d)
        start_step, val_loss = ckpt["step"], ckpt["val_loss"]
        if start_step >= cfg.max_steps:
            say(f"the run is complete: step {start_step} of --max-steps {cfg.max_steps}")
        if d.master:
            trim_log(log_path, start_step)
    elif d.master and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run in a log dir without checkpoints: start clean

    hella_examples = []
    if cfg.hellaswag_every > 0:
        def load():
            return hellaswag.load_examples(split=None if cfg.hellaswag_jsonl else "val",
                                           jsonl=cfg.hellaswag_jsonl or None,
                                           limit=cfg.hellaswag_limit or None)
        # rank 0 downloads the val split if it is not cached yet; the others then read it
        hella_examples = load() if d.master else []
        if d.ddp:
            dist.barrier()
        hella_examples = hella_examples or load()
    enc = get_encoding()
    peak = peak_flops(d.device_type)
    flops_token = flops_per_token(model_config, T)
    tokens_per_step = cfg.total_batch_size
    timed_steps, timed_seconds = 0, 0.0
    first_val = None

    for step in range(start_step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        resumed_here = ckpt is not None and step == start_step

        # evaluations see the model after `step` updates; the clock is stopped meanwhile
        if not resumed_here and cfg.eval_every > 0 and (step % cfg.eval_every == 0 or last):
            val_loss = evaluate_loss(eval_model, val_loader, val_windows, d, bf16)
            first_val = val_loss if first_val is None else first_val
            say(f"step {step:5d} | val loss {val_loss:.4f}")
            if d.master:
                log_line(log_path, step, "val", val_loss)
        if (not resumed_here and hella_examples and
                (step % cfg.hellaswag_every == 0 or last)):
            # the uncompiled module: eval shapes vary by example, and must not recompile
            n, correct, correct_norm = hellaswag.evaluate(
                lambda idx: raw_model(idx)[0], hella_examples, device=d.device,
                autocast=lambda: autocast(d.device_type, bf16), rank=d.rank,
                world_size=d.world_size, enc=enc, block_size=model_config.block_size)
            counts = all_reduce_sum(torch.tensor([n, correct_norm], device=d.device,
                                                 dtype=torch.long), d)
            acc = counts[1].item() / max(1, counts[0].item())
            say(f"step {step:5d} | HellaSwag acc_norm {acc:.4f} ({counts[0].item()} examples)")
            if d.master:
                log_line(log_path, step, "hella", acc)
        if (d.master and not resumed_here and cfg.sample_every > 0 and step > 0
                and (step % cfg.sample_every == 0 or last)):
            print_samples(raw_model, enc, "Hello, I'm a language model,", 4, 32, d.device,
                          seed=42 + step)
        if (not resumed_here and step > 0 and
                (last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0))):
            save_checkpoint(cfg, d, raw_model, optimizer, train_loader, step, val_loss)
        if last:
            break

        # one optimizer step over total_batch_size tokens
        t0 = time.time()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=d.device)
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            # DDP all-reduces gradients in backward(); in all but the last micro step there
            # is nothing to average yet, so skip the communication
            sync = not d.ddp or micro_step == grad_accum_steps - 1
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with autocast(d.device_type, bf16):
                    _, loss = model(x, y)
                # gradients add up over micro steps, but the objective is the MEAN over
                # the whole batch: divide each micro batch's mean loss by their number
                loss = loss / grad_accum_steps
                loss_accum += loss.detach()
                loss.backward()
        loss_accum = all_reduce_sum(loss_accum, d) / d.world_size
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        lr = get_lr(step, cfg.max_lr, min_lr, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if d.device_type == "cuda":
            torch.cuda.synchronize()  # wait for the GPU before reading the clock
        dt = time.time() - t0
        loss_value = loss_accum.item()
        if not math.isfinite(loss_value):
            raise UserError(f"the loss is {loss_value} at step {step}: training diverged; "
                            "the newest checkpoint is the last good one (lower --max-lr and "
                            "--resume)")
        tokens_per_sec = tokens_per_step / dt  # over all ranks
        if step - start_step >= 10 or cfg.max_steps - start_step < 20:  # skip compile warm-up
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + dt
        mfu = "" if peak is None else \
            f" | MFU {100 * flops_token * tokens_per_sec / (peak * d.world_size):.1f}%"
        say(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
            f"{1000 * dt:.1f} ms | {tokens_per_sec:,.0f} tok/s{mfu}")
        if d.master:
            log_line(log_path, step, "train", loss_value)

    if timed_steps and d.master:
        tps = tokens_per_step * timed_steps / timed_seconds
        mfu = "" if peak is None else \
            f", MFU {100 * flops_token * tps / (peak * d.world_size):.1f}%"
        print(f"average over {timed_steps} timed steps: {1000 * timed_seconds / timed_steps:.1f} "
              f"ms/step, {tps:,.0f} tok/s{mfu}")
    if first_val is not None and d.master:
        print(f"val loss: {first_val:.4f} at the first evaluation, {val_loss:.4f} at the end")


def save_checkpoint(cfg, d, raw_model, optimizer, train_loader, step, val_loss):
    rng = rng_state(d)  # a collective on CUDA with DDP: every rank takes part
    if not d.master:
        return
    ckpt = {
        "kind": CHECKPOINT_KIND,
        "model": raw_model.state_dict(),
        "model_config": dataclasses.asdict(raw_model.config),
        "config": dataclasses.asdict(cfg),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "val_loss": val_loss,
        "train_loader": train_loader.state_dict(),
        "rng": rng,
    }
    path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
    # a kill at any moment leaves the previous checkpoints whole and no half-written file
    # under a checkpoint name (the temp file is .model_XXXXX.pt.tmp)
    with fineweb.atomic_write(path) as f:
        torch.save(ckpt, f)
    print(f"saved {path}")
    if cfg.keep_checkpoints > 0:
        for old in list_checkpoints(cfg.log_dir)[:-cfg.keep_checkpoints]:
            os.remove(old)


def sample_command(cfg, args):
    if not getattr(args, "checkpoint", None):
        raise UserError("--sample needs --checkpoint PATH (a model_XXXXX.pt in your log dir)")
    device, _ = resolve_device(cfg.device)
    model, _ = load_checkpoint(args.checkpoint, device)
    print_samples(model, get_encoding(), args.prompt, args.num_samples, args.max_new_tokens,
                  device, seed=cfg.seed, top_k=args.top_k, temperature=args.temperature)


def main(argv=None):
    cfg, args = parse_config(argv)
    try:
        if getattr(args, "sample", False):
            sample_command(cfg, args)
        elif getattr(args, "export_hf", None):
            if not getattr(args, "checkpoint", None):
                raise UserError("--export-hf needs --checkpoint PATH")
            model, _ = load_checkpoint(args.checkpoint, "cpu")
            export_hf(model, args.export_hf)
            print(f"wrote {args.export_hf}/config.json and model.safetensors")
        elif getattr(args, "plot", None):
            if not os.path.isfile(os.path.join(args.plot, "log.txt")):
                raise UserError(f"no log.txt in {args.plot}/")
            path = os.path.join(args.plot, "loss.png")
            plot_log(args.plot, getattr(args, "preset", None)).savefig(path, dpi=100)
            print(f"wrote {path}")
        else:
            train(cfg, args)
    except (UserError, fineweb.ShardError, fineweb.InputError, hellaswag.HellaSwagError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
