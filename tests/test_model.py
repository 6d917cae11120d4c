"""TinyTransformer: shapes, causality, KV cache, initial loss, chunked loss, sampling filters."""

from __future__ import annotations

import math

import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from model import ModelConfig, TinyTransformer, sample_next  # noqa: E402
from model.tiny_transformer import Dropout, bf16_causal_attention  # noqa: E402

CFG = ModelConfig(vocab_size=300, n_layers=2, d_model=32, n_heads=4, max_seq_length=24)


def make_model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return TinyTransformer(cfg).eval()


def test_logits_shape_and_tied_output():
    model = make_model()
    logits, loss = model(torch.randint(0, 300, (3, 10)))
    assert logits.shape == (3, 10, 300) and loss is None
    assert model.wte.weight.data_ptr() == model.wte.weight.data_ptr()
    assert not any(name.startswith("lm_head") for name, _ in model.named_parameters())  # tied, no second matrix


def test_causal_masking_later_tokens_never_change_earlier_logits():
    model = make_model()
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
    cfg = ModelConfig(vocab_size=8000, n_layers=2, d_model=128, n_heads=4, max_seq_length=64)
    model = make_model(cfg=cfg)
    x = torch.randint(0, 8000, (4, 65))
    with torch.no_grad():
        loss = model.loss(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(8000)) < 0.1


def assert_chunked_loss_equals_full(cfg=CFG):
    """The loss and two gradients, computed over the whole logits and 7 positions at a time, agree."""
    x = torch.randint(0, 300, (4, 21))
    results = []
    for chunk in (0, 7):
        model = make_model(cfg=cfg).train()
        loss = model.loss(x[:, :-1], x[:, 1:], chunk_tokens=chunk)
        loss.backward()
        results.append((loss.item(), model.wte.weight.grad.clone(), model.h[0].attn.c_attn.weight.grad.clone()))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert torch.allclose(results[0][2], results[1][2], atol=1e-6)
    return x


def test_chunked_loss_equals_full_loss_and_gradients():
    assert_chunked_loss_equals_full()


def test_forward_loss_matches_loss_method():
    model = make_model()
    x = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        _, a = model(x[:, :-1], x[:, 1:])
        b = model.loss(x[:, :-1], x[:, 1:])
        c = model.loss(x[:, :-1], x[:, 1:], chunk_tokens=5)  # the evaluation path: no gradients computed
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a, c, atol=1e-5)


def test_bf16_fast_path_matches_fp32_loss_and_gradients():
    """Autocast bf16 + chunked loss + bf16 attention: the same loss and gradients as plain fp32, to bf16 precision."""
    x = torch.randint(0, 300, (4, 21))
    results = []
    for fast in (False, True):
        model = make_model().train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            loss = model.loss(x[:, :-1], x[:, 1:], chunk_tokens=16 if fast else 0)
        loss.backward()
        results.append((loss.item(), model.wte.weight.grad.clone(), model.h[0].attn.c_attn.weight.grad.clone()))
    (loss_a, wte_a, attn_a), (loss_b, wte_b, attn_b) = results
    assert abs(loss_a - loss_b) < 0.01 * loss_a
    for a, b in ((wte_a, wte_b), (attn_a, attn_b)):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
        assert abs(a.norm() - b.norm()) < 0.05 * a.norm()


def test_bf16_attention_is_causal_and_matches_fp32():
    model = make_model()
    x = torch.randint(0, 300, (2, 16))
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 5) % 300
    with torch.no_grad():
        plain, _ = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_x, _ = model(x)
            fast_y, _ = model(y)
    assert torch.allclose(fast_x[:, :9], fast_y[:, :9])  # later tokens never change earlier logits
    assert (fast_x.float() - plain).abs().max() < 0.05 * plain.abs().max()



def test_bf16_attention_in_query_blocks_matches_fp32_attention_and_its_gradients():
    """Contexts longer than one block of queries (the last one partial): the scores the causal mask
    discards are skipped, yet output and gradients equal PyTorch's fp32 attention to bf16 precision."""
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 150, 16
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, H, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = bf16_causal_attention(q, k, v, D)
    fast.float().backward(grad_out)
    fast_grads = [t.grad.clone() for t in (q, k, v)]
    exact = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference = torch.nn.functional.scaled_dot_product_attention(*exact, is_causal=True)
    reference.backward(grad_out)
    assert (fast.float() - reference).abs().max() < 0.02 * reference.abs().max()
    for got, want in zip(fast_grads, (t.grad for t in exact)):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
        assert (got - want).abs().max() < 0.03 * want.abs().max()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation: the same numbers
        assert torch.equal(bf16_causal_attention(q, k, v, D), fast)


def test_dropout_zeroes_about_p_rescales_and_reuses_its_mask_in_backward():
    torch.manual_seed(0)
    drop = Dropout(0.25).train()
    x = torch.ones(200, 1000, requires_grad=True)
    out = drop(x)
    zeroed = (out == 0).float().mean().item()
    assert abs(zeroed - 0.25) < 0.01
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # gradient flows exactly where the output kept x
    assert torch.equal(drop.eval()(x), x)
    try:
        Dropout(1.0)
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


ROTARY = dict(positions="rotary", activation="relu2")


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


def test_hand_written_backward_passes_match_autograd():
    """Rotary positions and squared ReLU have their own backward (speed): gradcheck both."""
    from model.tiny_transformer import _RotaryFunction, _SquaredReLUFunction, rotary_tables

    qk = torch.randn(2, 5, 2, 3, 8, dtype=torch.double, requires_grad=True)  # (B, T, q/k, heads, head_dim)
    for dims in (8, 4):  # every dimension rotating, and half of them
        cos, sin = (t[:, None, :].double() for t in rotary_tables(torch.arange(5), 8, dims, 100.0))
        assert torch.autograd.gradcheck(lambda t: _RotaryFunction.apply(t, cos, sin, dims), (qk,))
    h = torch.randn(40, dtype=torch.double)
    h = (h + 0.1 * h.sign()).requires_grad_()  # away from the kink at 0, where the gradcheck's finite differences break
    assert torch.autograd.gradcheck(_SquaredReLUFunction.apply, (h,))


def test_measured_options_qk_norm_and_logit_softcap_keep_the_size_cache_and_chunked_gradients():
    """The quality issue's options: no parameters added, the KV cache still equals recomputation, the chunked
    loss (its own softcap backward) equals autograd through the full logits, and the cap bounds the logits."""
    for options in ({"qk_norm": True}, {"logit_softcap": 2.0}, {"qk_norm": True, "positions": "learned"}):
        cfg = ModelConfig(vocab_size=300, n_layers=2, d_model=32, n_heads=2, max_seq_length=24,
                          **{**ROTARY, **options})
        model = make_model(cfg=cfg)
        assert model.num_parameters() == make_model(cfg=ModelConfig(**{**cfg.to_dict(), "qk_norm": False,
                                                                       "logit_softcap": 0.0})).num_parameters()
        prompt = [2, 17, 42, 99]
        assert list(model.generate(prompt, 30, temperature=0)) == list(model.generate(prompt, 30, temperature=0,
                                                                                       use_cache=False))
        x = assert_chunked_loss_equals_full(cfg)
        if "logit_softcap" in options:
            with torch.no_grad():
                model.wte.weight.mul_(100)  # raw logits far beyond the cap
                assert model(x)[0].abs().max() <= 2.0


def test_checkpoints_of_earlier_architectures_still_load(tmp_path):
    """A best_model.pt of the first block (no positions/activation keys) and of the rotary block (no option keys)
    loads with load_model and computes what it computed."""
    sys.path.insert(0, str(REPO / "stages"))
    from lib.training.checkpoints import load_model
    first = {"vocab_size": 300, "n_layers": 2, "d_model": 32, "n_heads": 4, "mlp_ratio": 4, "dropout": 0.0,
             "max_seq_length": 24}
    rotary = {**first, "positions": "rotary", "rotary_base": 10000.0, "rotary_fraction": 1.0, "activation": "relu2"}
    x = torch.randint(0, 300, (1, 12))
    for saved_config in (first, rotary):
        model = make_model(cfg=ModelConfig(**saved_config))
        path = tmp_path / "best_model.pt"
        torch.save({"format": "tiny-transformer-checkpoint/1", "kind": "best", "model": model.state_dict(),
                    "model_config": saved_config}, path)
        loaded, _ = load_model(path)
        assert not loaded.cfg.qk_norm and loaded.cfg.logit_softcap == 0.0
        with torch.no_grad():
            assert torch.equal(loaded(x)[0], model(x)[0])
