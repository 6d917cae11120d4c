"""The CPU fast path (model/fast_cpu.py): each kernel against the reference operation it replaces, forward and
every gradient, in fp32 and bf16, at odd shapes (T = 7, head_dim 10, rows not a multiple of the chunk); then a
fast-path model against the reference model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model import ModelConfig, TinyTransformer  # noqa: E402
from model import fast_cpu  # noqa: E402
from model.fast_cpu import use_fast_cpu_path  # noqa: E402
from model.tiny_transformer import CausalSelfAttention, rotary_tables  # noqa: E402

# bf16 keeps 8 bits of mantissa: a relative error of 2^-8 per rounding
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Equal to the dtype's precision, relative to the largest value."""
    got, want = got.float(), want.float()
    error = (got - want).abs().max().item()
    assert error <= TOLERANCE[dtype] * max(1.0, want.abs().max().item()), f"{what}: max error {error:.3g}"


def forward_and_gradients(fn, inputs: list[torch.Tensor], grad_out_seed: int = 1):
    """fn's output and the gradients of every input, under a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out.dtype)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@DTYPES
def test_squared_relu_equals_relu_then_square(dtype):
    x = torch.randn(7, 10, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).to(dtype)  # away from the kink at 0
    fast, (fast_grad,) = forward_and_gradients(fast_cpu.squared_relu, [x])
    plain, (plain_grad,) = forward_and_gradients(lambda t: F.relu(t).square(), [x])
    assert torch.equal(fast, plain)
    assert_close(fast_grad, plain_grad, dtype, "d/dx")
    with torch.no_grad():
        assert torch.equal(fast_cpu.squared_relu(x), plain)
    assert torch.autograd.gradcheck(fast_cpu.SquaredReLU.apply, (x.double().requires_grad_(),))


@DTYPES
@pytest.mark.parametrize("dims", [10, 6], ids=["all-dims", "partial"])
def test_rotary_kernel_equals_the_reference_rotation(dtype, dims):
    """qk (B, T, q/k, heads, head_dim) = (2, 7, 2, 3, 10): both outputs and qk's gradient."""
    qk = torch.randn(2, 7, 2, 3, 10).to(dtype)
    cos, sin = rotary_tables(torch.arange(7), 10, dims, 100.0)
    rotary = (cos, sin, dims)

    def both(fn):
        return lambda t: torch.cat(fn(t, rotary), dim=-1)  # q and k side by side: one output to differentiate

    fast, (fast_grad,) = forward_and_gradients(both(fast_cpu.rotate_queries_keys), [qk])
    plain, (plain_grad,) = forward_and_gradients(both(CausalSelfAttention.rotate_queries_keys), [qk])
    assert torch.equal(fast, plain)  # the same addcmul, written into another layout
    assert_close(fast_grad, plain_grad, dtype, "d/dqk")
    cos64, sin64 = (t[:, None, :].double() for t in (cos, sin))
    assert torch.autograd.gradcheck(lambda t: fast_cpu.RotateQueriesKeys.apply(t, cos64, sin64, dims),
                                    (qk.double().requires_grad_(),))


@DTYPES
def test_dropout_keeps_about_1_minus_p_rescales_and_reuses_its_mask_in_backward(dtype):
    torch.manual_seed(0)
    drop = fast_cpu.Dropout(0.25).train()
    x = torch.randn(201, 997).to(dtype).requires_grad_()
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    scale = torch.tensor(1 / 0.75, dtype=dtype)
    assert torch.equal(out[kept], x.detach()[kept] * scale)  # as nn.Dropout: kept values scaled by 1 / (1 - p)
    grad_out = torch.randn(out.shape).to(dtype)
    out.backward(grad_out)
    assert torch.equal(x.grad, torch.where(kept, grad_out * scale, torch.zeros((), dtype=dtype)))
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match="dropout"):
        fast_cpu.Dropout(1.0)


def reference_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("T", [7, 150], ids=["T7", "T150-three-query-blocks"])
def test_blocked_attention_kernel_in_fp32_equals_pytorch_attention(T):
    """The kernel's own arithmetic, at fp32 precision: q, k, v (B*heads, T, head_dim 10)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, T, 10) for _ in range(3))
    kernel = lambda q, k, v: fast_cpu.CausalAttention.apply(q, k, v, 10 ** -0.5)  # noqa: E731
    fast, fast_grads = forward_and_gradients(kernel, [q, k, v])
    plain, plain_grads = forward_and_gradients(reference_attention, [q, k, v])
    assert_close(fast, plain, torch.float32, "output")
    for name, got, want in zip("qkv", fast_grads, plain_grads):
        assert_close(got, want, torch.float32, f"d/d{name}")
    assert torch.equal(fast_cpu.CausalAttention.forward(None, q, k, v, 10 ** -0.5), fast), "no_grad: same numbers"


@pytest.mark.parametrize("T", [7, 150], ids=["T7", "T150-three-query-blocks"])
def test_attention_under_bf16_autocast_equals_pytorch_attention(T):
    """attend() as the fast path calls it: bf16 under CPU autocast, the plain operation otherwise."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 10) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, fast_grads = forward_and_gradients(fast_cpu.attend, [q, k, v])
        with torch.no_grad():
            assert torch.equal(fast_cpu.attend(q, k, v), fast), "evaluation: the same numbers"
    assert fast.dtype == torch.bfloat16
    plain, plain_grads = forward_and_gradients(reference_attention, [q, k, v])
    assert_close(fast, plain, torch.bfloat16, "output")
    for name, got, want in zip("qkv", fast_grads, plain_grads):
        assert_close(got, want, torch.bfloat16, f"d/d{name}")
    assert torch.equal(fast_cpu.attend(q, k, v), CausalSelfAttention.attend(q, k, v)), "fp32: the plain operation"
    one_query = q[:, :, -1:]  # generation's step: one new query sees every cached key
    assert torch.equal(fast_cpu.attend(one_query, k, v), CausalSelfAttention.attend(one_query, k, v))


def reference_loss(h, weight, targets, softcap=0.0):
    logits = h @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float(), targets)


@DTYPES
@pytest.mark.parametrize("softcap", [0.0, 3.0], ids=["plain", "softcap"])
def test_chunked_linear_cross_entropy_equals_cross_entropy_of_the_whole_logits(dtype, softcap):
    """37 rows in chunks of 8 (the last one of 5), vocabulary 50, width 10: the loss, d/dh and d/dweight;
    bf16 as training runs it, under autocast; and the no_grad path evaluation takes."""
    torch.manual_seed(0)
    h, weight, targets = torch.randn(37, 10), torch.randn(50, 10), torch.randint(0, 50, (37,))

    def chunked(h, weight):
        return fast_cpu.ChunkedLinearCrossEntropy.apply(h, weight, targets, 8, fast_cpu.softmax_xent, True, softcap)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fast, fast_grads = forward_and_gradients(chunked, [h, weight])
        plain, plain_grads = forward_and_gradients(lambda h, w: reference_loss(h, w, targets, softcap), [h, weight])
        with torch.no_grad():
            evaluated = fast_cpu.ChunkedLinearCrossEntropy.apply(h, weight, targets, 8, fast_cpu.softmax_xent, False,
                                                                 softcap)
    assert_close(fast, plain, dtype, "loss")
    assert_close(evaluated, plain, dtype, "loss without gradients")
    for name, got, want in zip(("h", "weight"), fast_grads, plain_grads):
        assert_close(got, want, dtype, f"d/d{name}")


SMALL = dict(vocab_size=300, n_layers=2, d_model=40, n_heads=4, max_seq_length=24)  # head_dim 10


def reference_and_fast(cfg: ModelConfig, chunk_tokens: int):
    torch.manual_seed(0)
    reference = TinyTransformer(cfg).train()
    fast = TinyTransformer(cfg).train()
    fast.load_state_dict(reference.state_dict())
    assert use_fast_cpu_path(fast, chunk_tokens) is fast
    return reference, fast


def loss_and_gradients(model, x, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("architecture", [dict(positions="rotary", activation="relu2", rotary_fraction=0.6),
                                          dict(positions="learned", activation="gelu", logit_softcap=2.0)],
                         ids=["rotary-relu2", "learned-gelu-softcap"])
def test_fast_path_model_computes_the_reference_models_loss_and_gradients(bf16, architecture):
    """Same weights, T = 7, 4 x 7 = 28 rows in chunks of 8: the loss and every parameter's gradient."""
    cfg = ModelConfig(**SMALL, **architecture)
    reference, fast = reference_and_fast(cfg, chunk_tokens=8)
    x = torch.randint(0, 300, (4, 8))
    want_loss, want = loss_and_gradients(reference, x, bf16)
    got_loss, got = loss_and_gradients(fast, x, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert_close(got_loss, want_loss, dtype, "loss")
    assert got.keys() == want.keys()
    for name in want:
        # gradients of bf16 matmuls: compare directions and sizes, not single elements
        if bf16:
            cosine = F.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0)
            assert cosine > 0.99 and abs(got[name].norm() / want[name].norm() - 1) < 0.05, name
        else:
            assert_close(got[name], want[name], dtype, name)


def test_fast_path_keeps_the_weights_and_evaluates_generates_like_the_reference():
    """use_fast_cpu_path changes no parameter or state dict key; without gradients or autocast (evaluation,
    generation) the fast-path model computes exactly what the reference computes."""
    cfg = ModelConfig(**SMALL, dropout=0.2)
    reference, fast = reference_and_fast(cfg, chunk_tokens=0)
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert not any(isinstance(m, torch.nn.Dropout) for m in fast.modules())
    assert sum(isinstance(m, fast_cpu.Dropout) for m in fast.modules()) == 1 + 2 * cfg.n_layers
    reference.eval(), fast.eval()
    x = torch.randint(0, 300, (3, 24))
    with torch.no_grad():
        assert torch.equal(fast.loss(x[:, :-1], x[:, 1:]), reference.loss(x[:, :-1], x[:, 1:]))
        assert torch.equal(fast(x)[0], reference(x)[0])
    prompt = [5, 6, 7]
    assert (list(fast.generate(prompt, 30, 0.8, 20, generator=torch.Generator().manual_seed(1)))
            == list(reference.generate(prompt, 30, 0.8, 20, generator=torch.Generator().manual_seed(1))))


def test_compile_switches_on_a_fast_path_model():
    """enable_compile wraps the blocks and the loss kernel (lazily: nothing compiles until a step runs);
    disable_compile goes back to eager, the fallback train.py takes when compiling fails."""
    _, fast = reference_and_fast(ModelConfig(**SMALL), chunk_tokens=8)
    fast.enable_compile()
    assert callable(fast.compiled_hidden_states) and callable(fast.compiled_softmax_xent)
    fast.disable_compile()
    assert not hasattr(fast, "compiled_hidden_states") and not hasattr(fast, "compiled_softmax_xent")
    x = torch.randint(0, 300, (2, 9))
    assert torch.isfinite(fast.loss(x[:, :-1], x[:, 1:]))
