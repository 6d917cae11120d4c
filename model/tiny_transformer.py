"""TinyTransformer: a decoder-only language model in the GPT-2 layout, in plain PyTorch operations.

    token ids (B, T)
      -> token embedding (B, T, d) [+ learned position embedding (T, d)]
      -> n_layers x [ x + Attn(LN(x)) ; x + MLP(LN(x)) ]       (pre-norm blocks)
      -> final LayerNorm -> logits = h @ token_embedding.T   (tied weights)

Positions enter in one of two ways (ModelConfig.positions): "learned", a table of position
vectors added to the input (GPT-2), or "rotary", queries and keys rotated by angles
proportional to their position (RoFormer, GPT-NeoX): attention scores then depend on
relative positions only. The MLP's activation is the exact GELU, ReLU or squared ReLU.

Names follow GPT-2 (wte, wpe, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj,
ln_f), so the weights map one to one onto Hugging Face's GPT2LMHeadModel (learned positions,
GELU) or GPTNeoXForCausalLM (rotary positions): stages/lib/export/hf.py.

This is the reference: evaluation, generation and export run it as it is. Training first
calls use_fast_cpu_path (model/fast_cpu.py), which swaps a few of its operations, on that
model, for hand-written kernels that compute the same function faster on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """The architecture. The defaults are the trained one (config/defaults.yaml's train section)."""
    vocab_size: int = 8000
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    max_seq_length: int = 256
    positions: str = "rotary"      # "learned": a position table added to the input; "rotary": q, k rotated
    rotary_base: float = 10000.0   # the slowest rotation's period grows with this base
    rotary_fraction: float = 1.0   # share of each head's dimensions that rotate (the rest carry no position)
    activation: str = "relu2"      # MLP: "gelu" (exact), "relu", or "relu2" (squared ReLU)
    # Options measured for the quality issue (docs/experiments.md), off by default: neither has a
    # counterpart in the transformers architectures the export maps onto.
    qk_norm: bool = False          # queries and keys RMS-normalised per head before attention
    logit_softcap: float = 0.0     # > 0: logits = cap * tanh(logits / cap)

    @classmethod
    def from_saved(cls, saved: dict) -> ModelConfig:
        """A checkpoint's model_config. The keys an earlier one lacks get what it was trained with (the first
        block: learned positions, GELU; the rotary block: no qk_norm or softcap), never today's defaults."""
        first = {"positions": "learned", "rotary_base": 10000.0, "rotary_fraction": 1.0, "activation": "gelu",
                 "qk_norm": False, "logit_softcap": 0.0}
        return cls(**{**first, **saved})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def rotary_dims(self) -> int:
        """Rotated dimensions per head: an even number (dimensions rotate in pairs)."""
        return int(self.d_model // self.n_heads * self.rotary_fraction) // 2 * 2


def model_config(cfg: dict, vocab_size: int) -> ModelConfig:
    """The model's shape from the training settings (train.py's flags / the YAML's train section)."""
    shape = {field.name: cfg[field.name] for field in fields(ModelConfig) if field.name in cfg}
    return ModelConfig(**{**shape, "vocab_size": vocab_size})


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "relu2": squared_relu}


def rotary_tables(positions: torch.Tensor, head_dim: int, dims: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (T, head_dim) of each position's rotation: pair i turns by position / base^(2i/dims).

    Dimension j and j + dims/2 form a pair (GPT-NeoX's convention: the weights map onto its
    Hugging Face implementation unchanged). sin carries the rotation's signs (-sin for the first
    of a pair, +sin for the second); dimensions past `dims` get cos 1, sin 0: unrotated.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float, device=positions.device) / dims))
    angles = positions.float()[:, None] * inv_freq[None, :]
    unrotated = head_dim - dims
    cos = torch.cat([angles.cos(), angles.cos(), angles.new_ones(angles.shape[0], unrotated)], dim=-1)
    sin = torch.cat([-angles.sin(), angles.sin(), angles.new_zeros(angles.shape[0], unrotated)], dim=-1)
    return cos, sin


def swap_pairs(x: torch.Tensor, dims: int) -> torch.Tensor:
    """x with the two halves of its first `dims` dimensions exchanged (j <-> j + dims/2)."""
    half = dims // 2
    return torch.cat([x[..., half:dims], x[..., :half], x[..., dims:]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotate each pair (j, j + dims/2) of x's last dimension by its position's angle (cos, sin broadcast against x).

    A query at position m and a key at position n rotated this way have a dot product
    that depends on their content and on m - n only: attention sees relative positions.
    """
    return torch.addcmul(x * cos, swap_pairs(x, dims), sin)  # x * cos + swap_pairs(x) * sin, the sum in one pass


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.qk_norm = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.qk_norm
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        # Dropout acts on the embeddings and the residual branches, not on the attention
        # probabilities: there, PyTorch's fused attention would need a slower kernel.
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def queries_keys_values(self, x: torch.Tensor, rotary=None):
        """q, k, v (B, heads, T, head_dim) of x (B, T, d): each head attends in its own subspace."""
        B, T, C = x.shape
        qk, v = self.c_attn(x).split([2 * C, C], dim=2)
        qk = qk.view(B, T, 2, self.n_heads, self.head_dim)
        if self.qk_norm:  # (QK normalisation: Dehghani et al. 2023; the modded-nanogpt speedrun)
            qk = F.rms_norm(qk, (self.head_dim,))
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if rotary is None:
            return qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), v
        # keys are cached rotated: each keeps the position it was made at
        q, k = self.rotate_queries_keys(qk, rotary)
        return q, k, v

    @staticmethod
    def rotate_queries_keys(qk: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (B, heads, T, head_dim) from qk (B, T, 2, heads, head_dim) and rotary (cos, sin, dims)."""
        cos, sin, dims = rotary
        cos, sin = cos[:, None, :].to(qk.dtype), sin[:, None, :].to(qk.dtype)  # (T, 1, head_dim): broadcast over heads
        q, k = (apply_rotary(part, cos, sin, dims).transpose(1, 2) for part in qk.unbind(2))
        return q, k

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) v, each query seeing the keys up to its own position."""
        # A lone new query may look at every cached position; a block of queries with no
        # cache needs the causal mask. (Blocks on top of a cache are not used.)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None, rotary=None):
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, rotary)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        y = self.attend(q, k, v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {cfg.activation!r}")
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, cache=None, rotary=None):
        attn_out, new_cache = self.attn(self.ln_1(x), cache, rotary)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, new_cache


class TinyTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
        if cfg.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {cfg.positions!r}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.max_seq_length, cfg.d_model)
        else:  # the rotation of every position, computed once (not saved: it follows from the config)
            cos, sin = rotary_tables(torch.arange(cfg.max_seq_length), cfg.d_model // cfg.n_heads, cfg.rotary_dims,
                                     cfg.rotary_base)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor, start_pos: int = 0):
        """The blocks' input (B, T, d) before dropout, and the rotation of these positions (None: learned positions)."""
        T = idx.shape[1]
        if start_pos + T > self.cfg.max_seq_length:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_length {self.cfg.max_seq_length}")
        if self.cfg.positions == "learned":
            return self.wte(idx) + self.wpe(torch.arange(start_pos, start_pos + T, device=idx.device)), None
        window = slice(start_pos, start_pos + T)
        return self.wte(idx), (self.rotary_cos[window], self.rotary_sin[window], self.cfg.rotary_dims)

    def hidden_states(self, idx: torch.Tensor, caches=None, start_pos: int = 0):
        """Final-LayerNorm output (B, T, d) and the per-layer key/value caches."""
        x, rotary = self.embed(idx, start_pos)
        x = self.drop(x)
        new_caches = []
        for i, block in enumerate(self.h):
            x, cache = block(x, None if caches is None else caches[i], rotary)
            new_caches.append(cache)
        return self.ln_f(x), new_caches

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states; tied: the output projection is the embedding matrix."""
        logits = h @ self.wte.weight.T
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab); with targets, also the mean cross-entropy in nats/token."""
        h, _ = self.hidden_states(idx)
        logits = self.output_logits(h)
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats/token: what training minimises and validation measures."""
        h, _ = getattr(self, "compiled_hidden_states", self.hidden_states)(idx)
        return self.output_loss(h.reshape(-1, h.size(-1)), targets.reshape(-1))

    def output_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits of final hidden states h (N, d) against targets (N,)."""
        return F.cross_entropy(self.output_logits(h).float(), targets)

    def enable_compile(self) -> None:
        """torch.compile the transformer blocks that loss() runs (training speed; generation stays eager)."""
        self.compiled_hidden_states = torch.compile(self.hidden_states, dynamic=False)

    def disable_compile(self) -> None:
        self.__dict__.pop("compiled_hidden_states", None)

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
                logits = self.output_logits(h[0, -1]).float()
                token = sample_next(logits, temperature, top_k, top_p, generator)
                context.append(token)
                yield token
                if eos_id is not None and token == eos_id:
                    break
        finally:
            self.train(was_training)


def next_token_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a token is drawn from: logits / temperature, cut to the top k and to the top-p nucleus."""
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
    return torch.softmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(next_token_probabilities(logits, temperature, top_k, top_p), 1, generator=generator))
