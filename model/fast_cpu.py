"""The CPU fast path: hand-written kernels for a training step of model/tiny_transformer.py.

    use_fast_cpu_path(model, chunk_tokens)   # once, after building the model, before the optimizer

swaps, on that model, a few of the reference's plain operations for kernels that
compute the same function with fewer passes over memory; the weights, their names and
the state dict stay the same, so a checkpoint of either loads into the other.

    reference operation                     fast kernel (this file)
    attn.rotate_queries_keys (addcmul)      RotateQueriesKeys: written straight into attention's layout
    attn.attend (scaled_dot_product_attn)   bf16_causal_attention under CPU autocast: CausalAttention
    mlp.activation relu(x).square()         SquaredReLU: one saved tensor, one pass backward
    nn.Dropout (bernoulli_)                 Dropout: a quarter of the random number draws
    model.output_loss (whole logits)        ChunkedLinearCrossEntropy: chunk_tokens rows of logits at a time

The rotation, the activation and the attention use their kernel only when it was measured
faster (the numbers are in each docstring: one core, the default model's shapes): with
gradients, and for the attention under CPU autocast; otherwise they call the reference's own
operation, so generation on a fast-path model computes exactly what the reference computes.
The loss stays chunked without gradients too: validation during training, 64 windows of
the default model at a time, grew the process by 1.17 GB with whole logits, 0.26 GB chunked.
On a GPU the same kernels run, except the attention (PyTorch's own there).
tests/unit/test_fast_cpu.py checks each kernel's forward and gradients against the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.tiny_transformer import CausalSelfAttention, TinyTransformer, swap_pairs


def use_fast_cpu_path(model: TinyTransformer, chunk_tokens: int) -> TinyTransformer:
    """Put this file's kernels into `model` (in place; also returned). chunk_tokens <= 0: the whole logits at once."""
    for block in model.h:
        block.attn.rotate_queries_keys = rotate_queries_keys
        block.attn.attend = attend
        if model.cfg.activation == "relu2":
            block.mlp.activation = squared_relu
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Dropout):
                setattr(parent, name, Dropout(child.p))
    model.output_loss = functools.partial(output_loss, model, chunk_tokens)
    model.enable_compile = functools.partial(enable_compile, model)
    model.disable_compile = functools.partial(disable_compile, model)
    return model


def enable_compile(model: TinyTransformer) -> None:
    """The reference's torch.compile of the blocks, and of the loss's softmax kernel (the chunked
    output projection stays eager: its matmuls already run at library speed)."""
    TinyTransformer.enable_compile(model)
    model.compiled_softmax_xent = torch.compile(softmax_xent, dynamic=False)


def disable_compile(model: TinyTransformer) -> None:
    TinyTransformer.disable_compile(model)
    model.__dict__.pop("compiled_softmax_xent", None)


class SquaredReLU(torch.autograd.Function):
    """relu(x)^2 with a one-pass backward, grad * 2 relu(x), from relu(x) saved in the forward pass.

    Autograd's relu-then-square keeps two tensors and takes four passes backward;
    this takes one, which makes squared ReLU as cheap as the exact GELU (measured on
    a 8192 x 512 bf16 tensor on one core, forward + backward: 12.0 ms against 18.4 ms).
    """

    @staticmethod
    def forward(ctx, x):
        positive = torch.relu(x)
        ctx.save_for_backward(positive)
        return positive * positive

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, positive, value=2)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return SquaredReLU.apply(x)
    return F.relu(x).square()


class RotateQueriesKeys(torch.autograd.Function):
    """Queries and keys rotated, written straight into the (B, heads, T, head_dim) layout attention reads.

    qk is (B, T, 2, heads, head_dim), a view of the q/k/v projection. Forward is
    y = x cos + swap(x) sin, three elementwise passes per tensor whose output lands
    where the attention's batched matmuls want it (sparing them a copy of q and k);
    backward is its transpose, g cos + swap(g sin) = g cos + swap(g) swap(sin), since
    swap is its own inverse. Nothing but the small tables is saved.
    """

    @staticmethod
    def forward(ctx, qk, cos, sin, dims: int):
        ctx.save_for_backward(cos, sin)
        ctx.dims = dims
        B, T, _, H, D = qk.shape
        rotated = []
        for part in (qk[:, :, 0], qk[:, :, 1]):
            out = torch.empty(B, H, T, D, dtype=qk.dtype, device=qk.device)
            torch.addcmul(part * cos, swap_pairs(part, dims), sin, out=out.transpose(1, 2))  # = apply_rotary
            rotated.append(out)
        return tuple(rotated)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        B, H, T, D = grad_q.shape
        grad_qk = torch.empty(B, T, 2, H, D, dtype=grad_q.dtype, device=grad_q.device)
        swapped_sin = swap_pairs(sin, ctx.dims)
        for i, grad in enumerate((grad_q, grad_k)):
            grad = grad.transpose(1, 2)
            torch.addcmul(grad * cos, swap_pairs(grad, ctx.dims), swapped_sin, out=grad_qk[:, :, i])
        return grad_qk, None, None, None


def rotate_queries_keys(qk: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor]:
    if not (torch.is_grad_enabled() and qk.requires_grad):
        return CausalSelfAttention.rotate_queries_keys(qk, rotary)
    cos, sin, dims = rotary
    cos, sin = cos[:, None, :].to(qk.dtype), sin[:, None, :].to(qk.dtype)  # (T, 1, head_dim): broadcast over heads
    return RotateQueriesKeys.apply(qk, cos, sin, dims)


class DropoutMask(torch.autograd.Function):
    """x * mask / (1 - p); the scaled mask is saved for backward (the same mask, in x's dtype)."""

    @staticmethod
    def forward(ctx, x, p: float):
        # 16 random bits per element, four elements per 64-bit draw: a quarter of the
        # generator calls of bernoulli_ (measured 0.9 ms vs 2.9 ms for a 32 x 128 x 128
        # bf16 tensor on one core). p is rounded to a multiple of 1/65536.
        n = x.numel()
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= -32768 + round(p * 65536)
        # the scaled mask in x's dtype, cast from the comparison's bytes read as uint8: PyTorch's bool -> bf16
        # cast is not vectorised (measured on 32 x 256 x 128, 2 threads: 0.87 ms bool, 0.09 ms uint8;
        # torch.where with two broadcast scalars 1.17 ms)
        scale = torch.tensor(1.0 / (1.0 - p), dtype=x.dtype, device=x.device)
        scaled_mask = keep.view(torch.uint8).to(x.dtype).mul_(scale)
        ctx.save_for_backward(scaled_mask)
        return x * scaled_mask

    @staticmethod
    def backward(ctx, grad):
        (scaled_mask,) = ctx.saved_tensors
        return grad * scaled_mask, None


class Dropout(nn.Module):
    """nn.Dropout with a cheaper random mask: on the CPU, bernoulli_ was a tenth of a training step."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return DropoutMask.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.size(2) > 1 and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return bf16_causal_attention(q, k, v)
    return CausalSelfAttention.attend(q, k, v)


def bf16_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for the CPU under autocast, in its dtype.

    PyTorch's CPU flash attention is slow in bf16 (backward 3x slower than in fp32),
    and in fp32 it needs q, k, v and their gradients cast. For this model's short
    contexts, batched bf16 matmuls and a softmax (fp32 inside the kernel) are faster
    than either; CausalAttention skips the scores the causal mask would discard.
    """
    with torch.autocast("cpu", enabled=False):
        dtype = torch.get_autocast_dtype("cpu")
        B, H, T, D = q.shape
        q, k, v = (t.to(dtype).reshape(B * H, T, D) for t in (q, k, v))
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return CausalAttention.apply(q, k, v, D ** -0.5).view(B, H, T, D)
        return CausalAttention.forward(None, q, k, v, D ** -0.5).view(B, H, T, D)


def query_blocks(T: int, block: int = 64) -> list[tuple[int, int]]:
    """[start, end) of each block of queries; the last block takes what is left over."""
    return [(start, min(T, start + block)) for start in range(0, T, block)]


class CausalAttention(torch.autograd.Function):
    """Causal attention over (B*heads, T, head_dim) tensors, a block of queries at a time.

    The queries of block [a, b) see keys 0..b-1 only: their scores against later keys
    are masked to zero weight anyway, so they are never computed. With blocks of 64 at
    T = 256 that is 10/16 of the full T x T scores, softmax and gradients; smaller
    blocks cost more calls than they save. Each block's probabilities are kept for the
    backward pass, as autograd would keep the full matrix; nothing else is.
    Backward, per block: dV += P^T dY, dP = dY V^T, dS = P * (dP - rowsum(dP * P)) (the
    softmax's own backward kernel), dQ = dS K / sqrt(d), dK += dS^T Q / sqrt(d).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        T = q.shape[1]
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        out = torch.empty_like(q)
        probs = []
        for a, b in query_blocks(T):
            # the causal mask enters as an additive -inf bias, fused into the first matmul
            scores = torch.baddbmm(future[a:b, :b].expand(q.shape[0], b - a, b), q[:, a:b], k[:, :b].transpose(1, 2),
                                   alpha=scale)
            p = torch.softmax(scores, dim=-1)
            out[:, a:b] = torch.bmm(p, v[:, :b])
            if ctx is not None:  # without autograd (evaluation) a block's probabilities die here
                probs.append(p)
        if ctx is not None:
            ctx.save_for_backward(q, k, v, *probs)
            ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *probs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (a, b), p in zip(query_blocks(q.shape[1]), probs):
            g = grad_out[:, a:b]
            grad_v[:, :b].baddbmm_(p.transpose(1, 2), g)
            grad_scores = torch._softmax_backward_data(torch.bmm(g, v[:, :b].transpose(1, 2)), p, -1, p.dtype)
            grad_q[:, a:b] = torch.bmm(grad_scores, k[:, :b]).mul_(ctx.scale)
            grad_k[:, :b].baddbmm_(grad_scores.transpose(1, 2), q[:, a:b], alpha=ctx.scale)
        return grad_q, grad_k, grad_v, None


def output_loss(model: TinyTransformer, chunk_tokens: int, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """model.output_loss on the fast path: the output projection and its softmax are over two
    thirds of this model's FLOPs, the hot spot of a training step. See ChunkedLinearCrossEntropy."""
    if chunk_tokens <= 0 or chunk_tokens >= h.size(0):
        return TinyTransformer.output_loss(model, h, targets)
    kernel = model.__dict__.get("compiled_softmax_xent", softmax_xent)
    return ChunkedLinearCrossEntropy.apply(h, model.wte.weight, targets, chunk_tokens, kernel,
                                           torch.is_grad_enabled(), model.cfg.logit_softcap)


def softmax_xent(logits: torch.Tensor, targets: torch.Tensor):
    """Summed cross-entropy of one chunk and d(sum)/d(logits) = softmax - onehot, in logits' dtype.

    One softmax kernel does the work: it accumulates in fp32 even for bf16 logits,
    reading each row while it sits in cache, and writes the probabilities in the
    logits' dtype; they become the gradient in place. The loss is -log of the target's
    probability (for bf16 that is the rounded probability, fine for a training-loss
    readout; evaluation takes log_softmax instead). Measured per 512 x 8000 bf16
    chunk on one core: 2.1 ms, against 5.0 ms for max/sub/exp/sum/div by hand in fp32.
    """
    grad = torch.softmax(logits, dim=-1)
    rows = torch.arange(targets.numel(), device=grad.device)
    target_prob = grad[rows, targets].float()
    loss_sum = -target_prob.clamp_min(torch.finfo(torch.float32).tiny).log().sum()
    grad[rows, targets] -= 1.0
    return loss_sum, grad


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ weight.T, targets)), computed chunk by chunk.

    The gradient of cross-entropy with respect to the logits is softmax - onehot,
    known as soon as a chunk's logits are. So the forward pass computes each chunk's
    loss *and* its gradients for h and weight right away and drops the logits;
    backward only scales the stored gradients. Peak memory holds one chunk of logits
    instead of all B*T x vocab of them, and nothing is recomputed. Under autocast the
    matmuls run in the autocast dtype, the softmax and the sums in fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_tokens, kernel=softmax_xent, grad_enabled=True, softcap=0.0):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            h_low, w_low = h.to(dtype), weight.to(dtype)
            # (grad mode is always off in here: the caller says whether it was on, so that
            # evaluation under no_grad does not pay for gradients it will never use)
            needs_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            grad_h = torch.empty_like(h) if needs_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.size(0), chunk_tokens):
                h_chunk, t_chunk = h_low[start:start + chunk_tokens], targets[start:start + chunk_tokens]
                logits = h_chunk @ w_low.T
                if softcap > 0:  # logits = cap tanh(raw / cap); d logits / d raw = 1 - tanh^2
                    squashed = torch.tanh(logits / softcap)
                    logits = squashed * softcap
                if needs_grad:
                    loss_sum, grad_logits = kernel(logits, t_chunk)
                    if softcap > 0:
                        grad_logits = grad_logits * (1 - squashed * squashed)
                    grad_h[start:start + chunk_tokens] = grad_logits @ w_low
                    grad_w.add_(grad_logits.T @ h_chunk)  # accumulates in fp32, converting on the fly
                else:
                    # log_softmax accumulates in fp32 inside its kernel; only the picked
                    # log-probabilities are summed, in fp32, so bf16 logits need no fp32 copy.
                    log_probs = torch.log_softmax(logits, dim=-1)
                    loss_sum = -log_probs.gather(1, t_chunk[:, None]).float().sum()
                total += loss_sum
        n = h.size(0)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_output / ctx.n
        return grad_h * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None, None, None
