"""Generation with the exported ONNX model on onnxruntime and numpy: no torch anywhere.

The graph (written by lib/export/onnx.py) takes the new token ids and the key/value
cache of the tokens before them, and returns the next-token logits and the grown
cache:

    input_ids (1, T) int64, past_keys / past_values (layers, 1, heads, P, head_dim) float32
      -> logits (1, vocab), present_keys / present_values (layers, 1, heads, P + T, head_dim)

A prompt goes in whole with an empty cache (P = 0); then one token per step. When the
context is full, the last 3/4 of it is read again from an empty cache and generation goes
on: the same sliding window as TinyTransformer.generate, so greedy outputs are identical.
This module must not import torch (a test runs it with torch made unimportable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np


class OnnxLanguageModel:
    def __init__(self, folder: Path, threads: int = 1):
        import onnxruntime as ort

        folder = Path(folder)
        self.meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.max_seq_length = self.meta["max_seq_length"]

    def empty_cache(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.meta
        shape = (m["n_layers"], 1, m["n_heads"], 0, m["d_model"] // m["n_heads"])
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def step(self, new_ids: list[int], keys: np.ndarray, values: np.ndarray):
        """Next-token logits after `new_ids`, given the cache of every token before them."""
        logits, keys, values = self.session.run(None, {"input_ids": np.array([new_ids], dtype=np.int64),
                                                       "past_keys": keys, "past_values": values})
        return logits[0], keys, values

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> Iterator[int]:
        """Yield new token ids one at a time; temperature 0 is greedy."""
        if not prompt:
            raise ValueError("generate() needs at least one prompt token (e.g. the <s> id)")
        rng = np.random.default_rng(seed)
        context = list(prompt)[-self.max_seq_length:]
        keep = max(1, (self.max_seq_length * 3) // 4)
        (keys, values), fed = self.empty_cache(), 0
        for _ in range(max_new_tokens):
            if len(context) > self.max_seq_length:
                context, fed = context[-keep:], 0
                keys, values = self.empty_cache()
            logits, keys, values = self.step(context[fed:], keys, values)
            fed = len(context)
            token = sample_next(logits, temperature, top_k, top_p, rng)
            context.append(token)
            yield token
            if eos_id is not None and token == eos_id:
                break


def sample_next(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature, then top-k, then nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / temperature
    if 0 < top_k < logits.size:
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        drop = order[cumulative - probs[order] > top_p]  # keep the smallest set whose mass reaches top_p
        probs[drop] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
