"""The export's proofs: the exported models compute what the trained model computes.

export.py runs these in a fresh process (nothing of the export step still in memory)
on the folders it has just written, and fails when one does not hold:
- tokenizer: the Hugging Face tokenizer's ids equal SentencePiece's on every validation
  line and on hard strings (accents, inverted marks, digits, runs of spaces, tabs,
  characters that need byte fallback, emoji): no mismatch allowed;
- logits: the Hugging Face model's logits (GPT-2 or GPT-NeoX) equal ours in float32 on full-context validation
  windows, to max_logit_diff;
- greedy: transformers' generate and the ONNX runtime continue the proof prompts with
  exactly our greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HARD_STRINGS = [
    "¿Dónde está el niño? ¡Aquí, señor!", "Ñandú, pingüino, acción, corazón, güero", "ÁÉÍÓÚ áéíóú ü Ü ñ Ñ",
    "Capítulo 31, versículos 1-12: 1909 y 2024", "0123456789 3.14159 1,000,000", "a  b   c    d", "    four spaces",
    "trailing spaces   ", "\ttab\tseparated\t\tvalues", "mixed \t tab and spaces", "emoji 🙂🚀 and 👩‍👩‍👧",
    "日本語のテキスト 中文 한국어", "Ελληνικά, русский, עברית, العربية", "symbols: ∑ ∫ ≤ ≥ ≠ → ← ♥ ☃", "", " ", "x",
    "ﬁ ligature, ½ fraction, ² superscript", "«comillas» “quotes” ‘single’ — dash… ellipsis",
]


def prove_tokenizer(hf_tokenizer, sp, val_lines: list[str]) -> dict:
    mismatches = []
    for text in val_lines + HARD_STRINGS:
        ours, theirs = sp.encode(text), hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            mismatches.append({"text": text[:80], "sentencepiece": ours[:20], "hf": theirs[:20]})
    return {"strings": len(val_lines) + len(HARD_STRINGS), "mismatches": len(mismatches), "examples": mismatches[:5],
            "passed": not mismatches}


def prove_logits(hf_model, model, val_tokens: np.ndarray, windows: int, limit: float) -> dict:
    T = model.cfg.max_seq_length
    count = min(windows, (val_tokens.size - 1) // T)
    starts = np.linspace(0, val_tokens.size - T - 1, count).astype(np.int64)
    x = torch.from_numpy(np.stack([val_tokens[s:s + T] for s in starts]).astype(np.int64))
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf_model(x).logits
    diff = float((ours.float() - theirs.float()).abs().max())
    return {"windows": count, "window_tokens": T, "max_abs_diff": diff, "limit": limit, "passed": diff <= limit}


def prove_greedy(prompts: list[str], sp, ours, others: dict, tokens: dict) -> dict:
    """Greedy continuations of each prompt: ours against each other runtime's, token for token.

    others: runtime name -> greedy(ids, n); tokens: runtime name -> how many new tokens for a prompt's ids.
    """
    results, identical = [], True
    for prompt in prompts:
        ids = [sp.bos_id()] + sp.encode(prompt)
        for name, continue_greedily in others.items():
            reference = list(ours(ids, tokens[name](ids)))
            candidate = list(continue_greedily(ids, tokens[name](ids)))
            same = reference == candidate
            identical &= same
            first_difference = next((i for i, (a, b) in enumerate(zip(reference, candidate)) if a != b), None)
            results.append({"runtime": name, "prompt": prompt, "tokens": len(reference), "identical": same,
                            "first_difference": first_difference, "text": sp.decode(reference)})
    return {"identical": identical, "runs": results, "passed": identical}


def run_proofs(hf_dir: Path, onnx_dir: Path, model, sp, val_text: str, val_tokens: np.ndarray, cfg: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.export.onnx_runtime import OnnxLanguageModel

    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    onnx_model = OnnxLanguageModel(onnx_dir)
    model = model.float().eval()

    def hf_greedy(ids, n):
        prompt = torch.tensor([ids])
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                                eos_token_id=sp.eos_id(), pad_token_id=sp.pad_id())
        return out[0, len(ids):].tolist()

    eos = sp.eos_id()  # every runtime stops at </s>, the way generation is used
    val_lines = [line for line in val_text.split("\n") if line]
    proofs = {
        "tokenizer": prove_tokenizer(hf_tokenizer, sp, val_lines),
        "logits": prove_logits(hf_model, model, val_tokens, cfg["logit_windows"], cfg["max_logit_diff"]),
        "greedy": prove_greedy(cfg["proof_prompts"], sp, lambda ids, n: model.generate(ids, n, temperature=0, eos_id=eos),
                               {"transformers": hf_greedy,
                                "onnx": lambda ids, n: onnx_model.generate(ids, n, temperature=0, eos_id=eos)},
                               # transformers' GPT-2 stops at the context, where our generation slides a window
                               {"transformers": lambda ids: min(cfg["hf_greedy_tokens"], model.cfg.max_seq_length - len(ids)),
                                "onnx": lambda ids: cfg["onnx_greedy_tokens"]}),
    }
    proofs["passed"] = all(p["passed"] for p in proofs.values())
    return proofs
