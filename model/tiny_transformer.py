"""TinyTransformer: a decoder-only language model in the GPT-2 layout.

    token ids (B, T)
      -> token embedding (B, T, d) + learned position embedding (T, d)
      -> n_layers x [ x + Attn(LN(x)) ; x + MLP(LN(x)) ]       (pre-norm blocks)
      -> final LayerNorm -> logits = h @ token_embedding.T   (tied weights)

Names follow GPT-2 (wte, wpe, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj, ln_f) so the weights map one to one onto Hugging Face's GPT2LMHeadModel
(whose Conv1D weights are these Linear weights transposed).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    max_seq_length: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        # Dropout acts on the embeddings and the residual branches, not on the attention
        # probabilities: there it forces a slower attention kernel (about 15% of a CPU step).
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim): each head attends in its own subspace
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        # A lone new query may look at every cached position; a block of T queries
        # with no cache needs the causal mask. (Blocks on top of a cache are not used.)
        causal = T > 1
        # PyTorch's CPU flash-attention backward is about 3x slower in bf16 than in fp32
        # (measured: 25 ms vs 7.5 ms for one layer's batch); attention is a small share
        # of this model's FLOPs, so on the CPU it runs in fp32 even under autocast.
        fp32_attention = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if fp32_attention else contextlib.nullcontext():
            if fp32_attention:
                q, k, v = q.float(), k.float(), v.float()
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, cache=None):
        attn_out, new_cache = self.attn(self.ln_1(x), cache)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, new_cache


class TinyTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        # Residual projections get a smaller std so the residual stream does not grow with depth (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        # Small weights: logits start near zero, so the step-0 loss is about ln(vocab_size).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def enable_compile(self) -> None:
        """torch.compile the transformer blocks and the loss chunk kernel (training speed).

        The chunked output projection stays eager: its matmuls already run at library speed.
        """
        self._hidden_states = torch.compile(self.hidden_states, dynamic=False)
        self._softmax_xent = torch.compile(softmax_xent, dynamic=False)

    def disable_compile(self) -> None:
        self.__dict__.pop("_hidden_states", None)
        self.__dict__.pop("_softmax_xent", None)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, caches=None, start_pos: int = 0):
        """Final-LayerNorm output (B, T, d) and the per-layer key/value caches."""
        T = idx.shape[1]
        if start_pos + T > self.cfg.max_seq_length:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_length {self.cfg.max_seq_length}")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        new_caches = []
        for i, block in enumerate(self.h):
            x, cache = block(x, None if caches is None else caches[i])
            new_caches.append(cache)
        return self.ln_f(x), new_caches

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab); with targets, also the mean cross-entropy in nats/token."""
        h, _ = self.hidden_states(idx)
        logits = h @ self.wte.weight.T  # tied: the output projection is the embedding matrix
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
        """Mean cross-entropy in nats/token.

        With chunk_tokens > 0 the (B*T, vocab) logits never exist all at once: see
        ChunkedLinearCrossEntropy. The output projection and its softmax are over two
        thirds of this model's FLOPs, so this is the hot spot of a training step.
        """
        h, _ = getattr(self, "_hidden_states", self.hidden_states)(idx)
        h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        if chunk_tokens <= 0 or chunk_tokens >= h.size(0):
            return F.cross_entropy((h @ self.wte.weight.T).float(), targets)
        kernel = getattr(self, "_softmax_xent", softmax_xent)
        return ChunkedLinearCrossEntropy.apply(h, self.wte.weight, targets, chunk_tokens, kernel)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
                 eos_id: int | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (streaming).

        temperature 0 is greedy. With the KV cache each step feeds one token; when
        the context is full, the last 3/4 of it is re-read and generation goes on
        (a sliding window), so outputs may be longer than max_seq_length.
        """
        if not prompt:
            raise ValueError("generate() needs at least one prompt token (e.g. the <s> id)")
        was_training = self.training
        self.eval()
        device = self.wte.weight.device
        context = list(prompt)[-self.cfg.max_seq_length:]
        keep = max(1, (self.cfg.max_seq_length * 3) // 4)
        caches, fed = None, 0  # `fed` = how many tokens of `context` are already in the cache
        try:
            for _ in range(max_new_tokens):
                if len(context) > self.cfg.max_seq_length:
                    context, caches, fed = context[-keep:], None, 0
                if use_cache:
                    new = torch.tensor([context[fed:]], device=device)
                    h, caches = self.hidden_states(new, caches, start_pos=fed)
                    fed = len(context)
                else:
                    h, _ = self.hidden_states(torch.tensor([context], device=device))
                logits = (h[0, -1] @ self.wte.weight.T).float()
                token = sample_next(logits, temperature, top_k, top_p, generator)
                context.append(token)
                yield token
                if eos_id is not None and token == eos_id:
                    break
        finally:
            self.train(was_training)


def softmax_xent(logits: torch.Tensor, targets: torch.Tensor):
    """Summed cross-entropy of one chunk and d(sum)/d(logits) = softmax - onehot, in logits' dtype.

    Elementwise work over chunk x vocab values, done in place to save memory traffic;
    torch.compile fuses it further (TinyTransformer.enable_compile).
    """
    full = logits.float()  # a new tensor under autocast; in fp32 it is `logits`, which is not reused
    target_logit = full.gather(1, targets[:, None])
    # log-sum-exp by hand and in place, so that the exponentials double as the softmax
    row_max = full.amax(dim=-1, keepdim=True)
    exp = full.sub_(row_max).exp_()
    row_sum = exp.sum(dim=-1, keepdim=True)
    loss_sum = (row_sum.log() + row_max - target_logit).sum()
    grad = exp.div_(row_sum)
    grad[torch.arange(targets.numel(), device=grad.device), targets] -= 1.0
    return loss_sum, grad.to(logits.dtype)


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
    def forward(ctx, h, weight, targets, chunk_tokens, kernel=softmax_xent):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            h_low, w_low = h.to(dtype), weight.to(dtype)
            needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h) if needs_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.size(0), chunk_tokens):
                h_chunk, t_chunk = h_low[start:start + chunk_tokens], targets[start:start + chunk_tokens]
                logits = h_chunk @ w_low.T
                if needs_grad:
                    loss_sum, grad_logits = kernel(logits, t_chunk)
                    grad_h[start:start + chunk_tokens] = grad_logits @ w_low
                    grad_w += (grad_logits.T @ h_chunk).float()
                else:
                    loss_sum = F.cross_entropy(logits.float(), t_chunk, reduction="sum")
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
        return grad_h * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop tokens once the mass before them already exceeds top_p (the first token always stays)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
