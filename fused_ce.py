"""
Hand-written GPU kernels (Triton) for what torch.compile leaves on the table in GPT-2's
training step. Each is off by default, switched on by a train_gpt2.py flag, and timed as a
rung of `bench.py ladder`; tests/test_fused_ce.py checks each against the plain PyTorch
path on a CPU, through Triton's interpreter (TRITON_INTERPRET=1).

fused_linear_cross_entropy (--fused-ce): the lm_head matmul and the cross-entropy in one
autograd function. The plain path writes the (B*T, vocab) logits, reads them for the
log-softmax, zero-fills a tensor of the same size for nll_loss's backward and reads and
writes it again: passes over the step's largest tensor, whose time on an H100 is in
docs/performance.md. Here one Triton kernel reads each row of
logits, computes its loss, and overwrites the row with the row's gradient, so the backward
pass needs no further pass over the logits; the three matmuls stay cuBLAS's. The idea is
Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024); the one-pass max and sum is
the online softmax of Milakov & Gimelshein (2018).
"""

import functools

import torch

from common import UserError


@functools.cache
def _cross_entropy_kernel():
    """The Triton kernel, defined on first use, so that importing this module (as
    train_gpt2.py does) needs no Triton and costs nothing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        raise UserError("--fused-ce needs Triton: pip install triton (it comes with a CUDA "
                        "build of torch on Linux)") from None

    @triton.jit
    def cross_entropy_rows(logits_ptr, stride, targets_ptr, losses_ptr, n_cols, grad_scale,
                           WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        # one program per row of logits; int64, since rows * stride passes 2**31 at B=64
        row = tl.program_id(0).to(tl.int64)
        z_row = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        # pass 1: the row's max m and sum of exp(z - m), block by block, rescaling the
        # running sum whenever the max grows, so the logits are read once for both
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)  # log of the softmax's denominator
        z_target = tl.load(z_row + target).to(tl.float32)
        tl.store(losses_ptr + row, lse - z_target)  # -log softmax(z)[target]
        if WRITE_GRAD:
            # pass 2: d(mean loss)/dz = (softmax(z) - onehot(target)) / rows, written over
            # the logits in their own dtype. The row was read a moment ago, so with few
            # programs per multiprocessor this second read comes mostly from L2.
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(z_row + cols, (g * grad_scale).to(logits_ptr.dtype.element_ty),
                         mask=mask)

    return cross_entropy_rows


# the kernel's launch: 8,192 columns by 1,024 threads (32 warps) is 8 bf16 values, one
# 16-byte load, per thread and block; with only two such programs on a multiprocessor, the
# rows in flight (2 x 132 x 100 KB on an H100) stay in its 50 MB of L2 for the second pass.
# Unmeasured: `bench.py fused-ce` times the alternatives on a GPU.
LAUNCH = (8192, 32)  # (columns per block, warps per program)


def cross_entropy_rows(logits, targets, grad_scale=None, launch=LAUNCH):
    """Per-row losses (fp32) of logits (n, V) against targets (n,); with grad_scale the
    logits are overwritten by (softmax - onehot(target)) * grad_scale, their gradient of
    the mean loss over N rows when grad_scale is 1/N."""
    N, V = logits.shape
    assert logits.stride(1) == 1 and targets.is_contiguous()
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    block, num_warps = launch
    block = min(block, max(16, 1 << (V - 1).bit_length()))  # a power of two, as Triton needs
    _cross_entropy_kernel()[(N,)](logits, logits.stride(0), targets, losses, V,
                                  grad_scale or 0.0, WRITE_GRAD=grad_scale is not None,
                                  BLOCK=block, num_warps=num_warps)
    return losses


class FusedLinearCrossEntropy(torch.autograd.Function):
    """mean over rows of cross_entropy(x @ weight.T, targets), with the gradients computed
    in the forward pass, chunk by chunk of rows; the backward only scales them."""

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, chunk_rows, needs_grad, launch):
        # x: (N, C) the final layernorm's output; weight: (V, C) lm_head (= wte);
        # dtype: the matmuls' dtype, bf16 under autocast, as nn.Linear would cast to
        N = x.size(0)
        xc, w = x.to(dtype), weight.to(dtype)
        losses = torch.empty(N, dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for i in range(0, N, chunk_rows):
            rows = slice(i, min(i + chunk_rows, N))
            logits = xc[rows] @ w.t()  # (n, V), then its gradient in place
            losses[rows] = cross_entropy_rows(logits, targets[rows],
                                              1.0 / N if needs_grad else None, launch)
            if needs_grad:
                grad_x[rows] = logits @ w  # (n, C)
                grad_w += logits.t() @ xc[rows]  # (V, C), fp32 across chunks
        ctx.save_for_backward(grad_x, grad_w)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        # grad_loss is the 1/grad_accum_steps of the training loop's loss scaling
        return (grad_x * grad_loss.to(grad_x.dtype), (grad_w * grad_loss).to(grad_w.dtype),
                None, None, None, None, None)


def fused_linear_cross_entropy(x, weight, targets, chunk_rows=65536, launch=LAUNCH):
    """F.cross_entropy(x @ weight.T, targets) for x (..., C), targets (...), without the
    logits in memory beyond one chunk of rows at a time (65,536 rows: one micro step of
    the gpt2 preset, 6.6 GB of bf16 logits, the same as the plain path)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return FusedLinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight,
                                             targets.reshape(-1).contiguous(), dtype,
                                             chunk_rows, needs_grad, launch)


@functools.cache
def fused_loss_for_model():
    """The loss GPT.forward calls with --fused-ce: fused_linear_cross_entropy, which
    torch.compile does not trace but runs as written, its own kernels between compiled
    graphs. Made on first use, as torch.compiler.disable imports torch.compile's machinery
    (Dynamo, and with it Triton), which would slow the import of every script
    (docs/performance.md)."""
    return torch.compiler.disable(fused_linear_cross_entropy)
