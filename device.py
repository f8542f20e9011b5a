"""
The device a run uses, and what that device does well: bf16 in hardware or not, huge pages
for a CPU's big tensors, the accelerator's peak FLOP/s for MFU.
"""

import contextlib
import os

import torch

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
