"""
The device a run uses, and what that device does well: bf16 in hardware or not, the
choices that follow from it (device_policy: dtype, compile, fused AdamW, pinned memory,
GradScaler), the largest micro-batch that fits a GPU (--batch-size auto), huge pages for a
CPU's big tensors, the accelerator's peak FLOP/s for MFU.
"""

import contextlib
import dataclasses
import gc
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import UserError


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


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast at all


def autocast(device_type, dtype=None):
    """The context the forward runs in: bf16 or fp16 autocast (matmuls in the half type,
    reductions like the loss and softmax in fp32) or plain fp32. dtype: "bf16", "fp16",
    "fp32", True/False for bf16 or fp32, None for bf16 where the device is native."""
    if dtype is None or isinstance(dtype, bool):
        native = bf16_native(device_type) if dtype is None else dtype
        dtype = "bf16" if native else "fp32"
    if dtype in DTYPES:
        return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])
    return contextlib.nullcontext()


@dataclass(frozen=True)
class DevicePolicy:
    """What a run does on a device: each field is a choice a flag may override."""
    dtype: str  # "bf16", "fp16" or "fp32": --dtype, or under auto the device's pick
    compile: bool  # torch.compile by default
    fused_adamw: bool  # AdamW's one-kernel update
    pin_memory: bool  # page-locked batches, so the copy to the device runs asynchronously
    autocast_device: str  # the device_type torch.autocast is given
    grad_scaler: bool  # fp16 needs a GradScaler: its gradients underflow without one

    def describe(self):
        precision = "fp32" if self.dtype == "fp32" else f"{self.dtype} autocast"
        return (precision + (" with a GradScaler" if self.grad_scaler else "") +
                f", torch.compile {'on' if self.compile else 'off'}")


# torch's fused AdamW kernels exist for these device types (torch >= 2.5)
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "mps")


def device_policy(device_type, has_bf16=False, capability=None, dtype="auto"):
    """The choices for a device, from what it is and what it can do, and nothing else.
    device_type: "cpu", "cuda" or "mps"; has_bf16: it multiplies bf16 in hardware;
    capability: a CUDA GPU's (major, minor); dtype: --dtype, "auto" to let the device pick.

    auto: bf16 where it is native; fp16 and a GradScaler on a CUDA GPU without bf16 whose
    tensor cores do fp16 (compute capability 7.0 on: a V100 or a T4); otherwise fp32 (older
    GPUs like the GTX 10 series run fp16 slower than fp32). MPS stays in fp32 under auto
    until a Mac has measured its autocast faster, and gets no GradScaler, so no fp16."""
    tensor_cores = device_type == "cuda" and (capability or (0, 0)) >= (7, 0)
    if dtype == "auto":
        dtype = "bf16" if has_bf16 else "fp16" if tensor_cores else "fp32"
    if dtype == "fp16" and device_type == "mps":
        raise UserError("--dtype fp16 needs a GradScaler, which this script does not run on "
                        "mps: use --dtype bf16 or fp32")
    # inductor's Triton kernels need compute capability 7.0 too (torch refuses older GPUs)
    return DevicePolicy(dtype=dtype, compile=tensor_cores,
                        fused_adamw=device_type in FUSED_ADAMW_DEVICES,
                        pin_memory=device_type == "cuda", autocast_device=device_type,
                        grad_scaler=dtype == "fp16")


def use_huge_pages():
    """Have PyTorch's CPU allocator back tensors of 2 MB and more with 2 MB pages.

    Every training step frees and reallocates the logits (B*T*vocab floats) and their
    gradients. Memory that large comes fresh from the kernel each time, which faults it in
    and zeroes it page by page; 2 MB pages make 512 times fewer faults than 4 KB ones. This
    is PyTorch's own switch (its CPU tuning guide: THP_MEM_ALLOC_ENABLE=1), read once, at
    the first CPU allocation, so call this before any tensor exists. A value already set
    in the environment wins. Linux only; without transparent huge pages it changes nothing.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


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


def run_policy(device_type, dtype="auto", compile=None):
    """device_policy for this machine's device of that type, with --compile or
    --no-compile on top of the device's default."""
    capability = torch.cuda.get_device_capability() if device_type == "cuda" else None
    policy = device_policy(device_type, bf16_native(device_type), capability, dtype)
    return policy if compile is None else dataclasses.replace(policy, compile=compile)


# -----------------------------------------------------------------------------
# --batch-size auto: the largest micro-batch that fits the GPU


def fits(build, B, T, device):
    """Whether a forward, backward and optimizer step on B rows of T tokens runs without
    running out of CUDA memory. build() -> (model, optimizer), fresh: the model is called
    as model(idx, targets) -> (logits, loss), in the form the run trains it."""
    out_of_memory = False
    try:
        model, optimizer = build()
        x = torch.zeros((B, T), dtype=torch.long, device=device)  # (B, T)
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # free below, outside the handler: its traceback holds tensors
    model = optimizer = x = loss = None
    torch.compiler.reset()  # compiled code holds on to the model it was compiled for
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return not out_of_memory


def fit_micro_batch(build, start, T, total_batch_size, device_type, device="cpu",
                    dtype="fp32", world_size=1):
    """--batch-size auto: on CUDA, the largest of start, start/2, ... rows for which
    fits() holds; on a CPU or MPS, start (their memory is the machine's, and running out
    of it is swapping, not an error to catch). Under torchrun every rank takes the
    smallest micro-batch any rank found, so that all take the same steps.
    -> (B, the line that says what was chosen)"""
    B, memory = start, f"the preset's on {device_type}"
    if device_type == "cuda":
        while B >= 1:
            torch.cuda.reset_peak_memory_stats(device)
            with autocast(device_type, dtype):
                ok = fits(build, B, T, device)
            if ok:
                break
            B //= 2
        if B < 1:
            raise UserError(f"CUDA out of memory at micro-batch 1 x {T}: even one row does "
                            "not fit; use a smaller model or --seq-len")
        peak = torch.cuda.max_memory_reserved(device) / 2 ** 30
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        memory = f"{peak:.1f} of {total:.0f} GiB"
    if dist.is_available() and dist.is_initialized():
        smallest = torch.tensor([B], device=device if device_type == "cuda" else "cpu")
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        if smallest.item() < B:
            B, memory = int(smallest.item()), "another rank's"
    micro_steps = total_batch_size // (B * T * world_size)
    return B, f"micro-batch {B} x {T} (auto, {memory}), {micro_steps} micro steps"


def load_scaler(scaler, state):
    """A checkpoint's GradScaler state into scaler -> the steps it had skipped. The
    state of a run that was not in fp16 (or is not now) leaves the scaler as it is."""
    state = dict(state or {})
    skipped_steps = state.pop("skipped_steps", 0)
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
    return skipped_steps


# How PyTorch says that memory ran out: CUDA's and MPS's errors, the CPU allocator's
OUT_OF_MEMORY = ("out of memory", "can't allocate memory")


def is_out_of_memory(e):
    return isinstance(e, torch.OutOfMemoryError) or any(s in str(e) for s in OUT_OF_MEMORY)


def out_of_memory_error(e, B, T, newest=None):
    """The one line for memory that ran out in a run at micro-batch B x T (while building
    the model or in a step): half the micro-batch, or on CUDA auto's probe."""
    smaller = f"--batch-size {B // 2}" if B > 1 else "a smaller model or --seq-len"
    if "CUDA out of memory" in str(e):
        what, hint = "CUDA out of memory", f"{smaller}, or --batch-size auto"
    else:
        # the allocator's words and the size, without the C++ source position and the
        # per-device breakdown that follow
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        first = re.sub(r"^\[enforce fail[^]]*\]\s*(err == 0\.\s*)?", "", first)
        what = f"out of memory ({re.split(r'[.] (?:Error code|GPU [0-9])', first)[0][:150]})"
        hint = smaller
    kept = f"; the newest intact checkpoint is {newest}" if newest else ""
    return UserError(f"{what} at micro-batch {B} x {T}: try {hint}{kept}")
