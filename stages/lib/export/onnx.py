"""TinyTransformer -> ONNX with a key/value cache, for generation without torch (lib/export/onnx_runtime.py).

One graph serves the prompt and every later step: it takes the new tokens and the cache
of the tokens before them, so a position may attend to every cached position and to the
new ones up to itself (an explicit mask, where training uses is_causal). It returns only
the last position's logits: generation needs nothing else.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

OPSET = 20  # has LayerNormalization and Gelu as single operators


class CachedStep(torch.nn.Module):
    """The model's forward pass on new tokens after a cache: the graph that is exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_keys, past_values):
        m, cfg = self.model, self.model.cfg
        cached, new = past_keys.shape[3], input_ids.shape[1]
        head_dim, width = cfg.d_model // cfg.n_heads, cfg.d_model
        positions = torch.arange(new) + cached
        if cfg.positions == "learned":
            x, rotary = m.wte(input_ids) + m.wpe(positions), None
        else:
            # the model's precomputed tables become constants of the graph, gathered at the positions
            x, rotary = m.wte(input_ids), (m.rotary_cos[positions], m.rotary_sin[positions], cfg.rotary_dims)
        visible = torch.arange(cached + new)[None, :] <= positions[:, None]  # (new, cached + new)
        keys, values = [], []
        for i, block in enumerate(m.h):
            q, k, v = block.attn.queries_keys_values(block.ln_1(x), rotary)
            k, v = torch.cat([past_keys[i], k], dim=2), torch.cat([past_values[i], v], dim=2)
            keys.append(k)
            values.append(v)
            scores = (q @ k.transpose(-1, -2)) * head_dim ** -0.5
            attention = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            x = x + block.attn.c_proj((attention @ v).transpose(1, 2).reshape(1, new, width))
            x = x + block.mlp.c_proj(block.mlp.activation(block.mlp.c_fc(block.ln_2(x))))
        logits = m.output_logits(m.ln_f(x[:, -1]))
        return logits, torch.stack(keys), torch.stack(values)


def export_onnx(model, folder: Path, special_ids: dict) -> None:
    """Write folder/model.onnx (weights inside) and folder/model.json (what the runtime needs to know)."""
    cfg = model.cfg
    step = CachedStep(model.float().eval())
    head_dim = cfg.d_model // cfg.n_heads
    example = (torch.tensor([[special_ids["bos_id"], 5, 6]]), torch.zeros(cfg.n_layers, 1, cfg.n_heads, 2, head_dim),
               torch.zeros(cfg.n_layers, 1, cfg.n_heads, 2, head_dim))
    new = torch.export.Dim("new_tokens", min=1, max=cfg.max_seq_length)
    cached = torch.export.Dim("cached_tokens", min=0, max=cfg.max_seq_length - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, example, str(folder / "model.onnx"), dynamo=True, opset_version=OPSET, verbose=False,
                          external_data=False, input_names=["input_ids", "past_keys", "past_values"],
                          output_names=["logits", "present_keys", "present_values"],
                          dynamic_shapes={"input_ids": {1: new}, "past_keys": {3: cached}, "past_values": {3: cached}})
    meta = {**cfg.to_dict(), **special_ids, "opset": OPSET, "inputs": ["input_ids", "past_keys", "past_values"],
            "outputs": ["logits", "present_keys", "present_values"]}
    (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
