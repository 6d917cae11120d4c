"""The reference TinyTransformer: shapes, tied output, causality, KV cache, initial loss, sampling filters,
the config's defaults and old checkpoints. The CPU fast path's kernels: tests/unit/test_fast_cpu.py."""

from __future__ import annotations

import math

import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from model import ModelConfig, TinyTransformer, sample_next  # noqa: E402

# the first block's architecture (GPT-2's), small; with ROTARY, today's
CFG = ModelConfig(vocab_size=300, n_layers=2, d_model=32, n_heads=4, max_seq_length=24, positions="learned",
                  activation="gelu")
ROTARY = dict(positions="rotary", activation="relu2")


def make_model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return TinyTransformer(cfg).eval()


def test_logits_shape_and_tied_output():
    """The output projection is the token embedding matrix itself: the logits move with it, nothing else
    holds a vocab x d_model matrix, and the output's gradient lands in the embedding."""
    for cfg in (CFG, ModelConfig(**{**CFG.to_dict(), **ROTARY})):
        model = make_model(cfg=cfg)
        x = torch.randint(0, 300, (3, 10))
        logits, loss = model(x)
        assert logits.shape == (3, 10, 300) and loss is None
        h = torch.randn(5, cfg.d_model)
        with torch.no_grad():
            assert torch.allclose(model.output_logits(h), h @ model.wte.weight.T, atol=1e-6)
            model.wte.weight[7] += 1.0  # token 7's embedding is token 7's output row
            assert torch.allclose(model.output_logits(h)[:, 7], h @ model.wte.weight[7], atol=1e-6)
        vocab_by_width = [name for name, p in model.named_parameters() if p.shape == (cfg.vocab_size, cfg.d_model)]
        assert vocab_by_width == ["wte.weight"], f"a second vocab x d_model matrix: {vocab_by_width}"
        model.output_logits(torch.randn(2, cfg.d_model))[:, 11].sum().backward()  # no token 11 in the input
        assert model.wte.weight.grad is not None and model.wte.weight.grad[11].abs().sum() > 0



def test_causal_masking_later_tokens_never_change_earlier_logits():
    for cfg in (CFG, ModelConfig(**{**CFG.to_dict(), **ROTARY})):
        model = make_model(cfg=cfg)
        x = torch.randint(0, 300, (1, 16))
        y = x.clone()
        y[0, 10:] = (y[0, 10:] + 7) % 300
        with torch.no_grad():
            a, _ = model(x)
            b, _ = model(y)
        assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
        assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-3)


def test_kv_cache_generation_equals_full_recomputation():
    model = make_model()
    prompt = [2, 17, 42, 99]
    cached = list(model.generate(prompt, 40, temperature=0))  # 44 tokens > context 24: sliding window too
    full = list(model.generate(prompt, 40, temperature=0, use_cache=False))
    assert cached == full
    gen_a = torch.Generator().manual_seed(3)
    gen_b = torch.Generator().manual_seed(3)
    assert list(model.generate(prompt, 20, 0.9, 20, 0.9, gen_a)) == \
        list(model.generate(prompt, 20, 0.9, 20, 0.9, gen_b, use_cache=False))


def test_loss_at_initialisation_is_about_ln_vocab():
    model = make_model(cfg=ModelConfig(max_seq_length=64))  # the defaults: the trained architecture
    x = torch.randint(0, 8000, (4, 65))
    with torch.no_grad():
        loss = model.loss(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(8000)) < 0.1


def test_forward_loss_matches_loss_method():
    model = make_model()
    x = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        logits, a = model(x[:, :-1], x[:, 1:])
        b = model.loss(x[:, :-1], x[:, 1:])
    assert torch.allclose(a, b, atol=1e-6)
    by_hand = -torch.log_softmax(logits, -1).gather(2, x[:, 1:, None]).mean()
    assert torch.allclose(a, by_hand, atol=1e-5)


def test_dropout_is_on_in_training_and_off_in_eval_and_one_is_refused():
    model = make_model(cfg=ModelConfig(**{**CFG.to_dict(), "dropout": 0.3}))
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(model.loss(x, x), model.loss(x, x))  # eval: no dropout
        model.train()
        assert not torch.equal(model.loss(x, x), model.loss(x, x))
    try:
        TinyTransformer(ModelConfig(**{**CFG.to_dict(), "dropout": 1.0}))
    except ValueError as exc:
        assert "dropout" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_sampling_filters():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.5, -2.0])
    assert sample_next(logits, 0, 0, 1.0, None) == 0
    picks = {sample_next(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks == {0, 1}  # top-k 2
    picks = {sample_next(logits, 1.0, 0, 0.5, torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks == {0}  # the first token alone holds more than half the mass


def test_too_long_input_is_refused():
    model = make_model()
    try:
        model(torch.zeros(1, 25, dtype=torch.long))
    except ValueError as exc:
        assert "max_seq_length" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_rotary_kv_cache_and_sliding_window_equal_full_recomputation():
    """Cached keys keep the rotation of the position they were made at; after the window
    slides, positions restart at 0 in both paths."""
    for fraction in (1.0, 0.5):
        model = make_model(cfg=ModelConfig(vocab_size=300, n_layers=2, d_model=32, n_heads=2, max_seq_length=24,
                                           rotary_fraction=fraction, **ROTARY))
        assert not hasattr(model, "wpe"), "rotary positions need no position table"
        prompt = [2, 17, 42, 99]
        cached = list(model.generate(prompt, 40, temperature=0))  # 44 tokens > context 24: the window slides
        assert cached == list(model.generate(prompt, 40, temperature=0, use_cache=False))
        x = torch.randint(0, 300, (1, 20))
        with torch.no_grad():
            full, _ = model.hidden_states(x)
            first, caches = model.hidden_states(x[:, :12])
            rest, _ = model.hidden_states(x[:, 12:13], caches, start_pos=12)
        assert torch.allclose(full[:, :12], first, atol=1e-5) and torch.allclose(full[:, 12], rest[:, 0], atol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    from model.tiny_transformer import apply_rotary, rotary_tables

    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(query_position, key_position):
        cos_q, sin_q = rotary_tables(torch.tensor([query_position]), 16, 16, 10000.0)
        cos_k, sin_k = rotary_tables(torch.tensor([key_position]), 16, 16, 10000.0)
        return float((apply_rotary(q, cos_q, sin_q, 16) * apply_rotary(k, cos_k, sin_k, 16)).sum())

    assert abs(score(7, 3) - score(57, 53)) < 1e-4 and abs(score(7, 3) - score(8, 3)) > 1e-4


def test_activations_keep_the_parameter_count():
    counts = {act: make_model(cfg=ModelConfig(vocab_size=300, n_layers=2, d_model=32, n_heads=2, max_seq_length=24,
                                              activation=act)).num_parameters() for act in ("gelu", "relu", "relu2")}
    assert len(set(counts.values())) == 1
    x = torch.linspace(-2, 2, 9)
    from model.tiny_transformer import ACTIVATIONS
    assert torch.equal(ACTIVATIONS["relu2"](x), torch.relu(x) ** 2)


def test_measured_options_qk_norm_and_logit_softcap_keep_the_size_and_the_cache():
    """The quality issue's options: no parameters added, the KV cache still equals recomputation, and the cap
    bounds the logits. (The fast path's softcap backward: tests/unit/test_fast_cpu.py.)"""
    for options in ({"qk_norm": True}, {"logit_softcap": 2.0}, {"qk_norm": True, "positions": "learned"}):
        cfg = ModelConfig(vocab_size=300, n_layers=2, d_model=32, n_heads=2, max_seq_length=24,
                          **{**ROTARY, **options})
        model = make_model(cfg=cfg)
        assert model.num_parameters() == make_model(cfg=ModelConfig(**{**cfg.to_dict(), "qk_norm": False,
                                                                       "logit_softcap": 0.0})).num_parameters()
        prompt = [2, 17, 42, 99]
        assert list(model.generate(prompt, 30, temperature=0)) == list(model.generate(prompt, 30, temperature=0,
                                                                                       use_cache=False))
        if "logit_softcap" in options:
            x = torch.randint(0, 300, (2, 20))
            with torch.no_grad():
                model.wte.weight.mul_(100)  # raw logits far beyond the cap
                assert model(x)[0].abs().max() <= 2.0


def test_config_defaults_are_the_trained_architecture():
    """ModelConfig() is what config/defaults.yaml trains; an earlier checkpoint's missing keys are filled with the
    first architecture's values by from_saved, never by the defaults."""
    sys.path.insert(0, str(REPO / "stages"))
    from lib.runtime.config import DEFAULT_CONFIG, load_yaml

    train = load_yaml(DEFAULT_CONFIG)["train"]
    defaults = ModelConfig()
    for key in ("n_layers", "d_model", "n_heads", "mlp_ratio", "max_seq_length", "positions", "rotary_base",
                "rotary_fraction", "activation", "qk_norm", "logit_softcap"):
        assert getattr(defaults, key) == train[key], key
    first = ModelConfig.from_saved({"vocab_size": 300, "n_layers": 2, "d_model": 32, "n_heads": 4, "mlp_ratio": 4,
                                    "dropout": 0.0, "max_seq_length": 128})
    assert (first.positions, first.activation, first.max_seq_length) == ("learned", "gelu", 128)
    assert (first.rotary_base, first.rotary_fraction, first.qk_norm, first.logit_softcap) == (10000.0, 1.0, False, 0.0)
    assert ModelConfig.from_saved(defaults.to_dict()) == defaults, "a full config is taken as saved"


def test_checkpoints_of_earlier_architectures_still_load(tmp_path):
    """A best_model.pt of the first block (no positions/activation keys) and of the rotary block (no option keys)
    loads with load_model and computes what it computed."""
    sys.path.insert(0, str(REPO / "stages"))
    from lib.training.checkpoints import load_model
    first = {"vocab_size": 300, "n_layers": 2, "d_model": 32, "n_heads": 4, "mlp_ratio": 4, "dropout": 0.0,
             "max_seq_length": 24}
    rotary = {**first, "positions": "rotary", "rotary_base": 10000.0, "rotary_fraction": 1.0, "activation": "relu2"}
    x = torch.randint(0, 300, (1, 12))
    for saved_config, trained in ((first, CFG), (rotary, ModelConfig(**{**CFG.to_dict(), **ROTARY}))):
        model = make_model(cfg=trained)
        path = tmp_path / "best_model.pt"
        torch.save({"format": "tiny-transformer-checkpoint/1", "kind": "best", "model": model.state_dict(),
                    "model_config": saved_config}, path)
        loaded, _ = load_model(path)
        assert loaded.cfg == trained
        with torch.no_grad():
            assert torch.equal(loaded(x)[0], model(x)[0])
