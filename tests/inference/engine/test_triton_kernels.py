"""The Triton kernels (W2A8 ternary matmul, fused multi-adapter DoRA path) against the PyTorch
paths they replace on CUDA. No GPU here: the kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1), and are compiled for sm_90 through Triton's bundled ptxas to catch what only
the compiler sees. Triton is an optional extra: without it these tests skip.

Triton decides interpreter or compiler when `triton.jit` wraps a kernel; triton_kernels wraps
lazily, once per mode, and its kernels use only builtins (not triton.language's own jit helpers,
which are wrapped when triton is imported), so setting TRITON_INTERPRET per test works even when
something earlier in the session imported triton (torch.compile does, when triton is installed).
"""

import sys

import pytest
import torch

from inference.engine import triton_kernels as tk
from inference.engine.bitlinear import BitLinear, pack_ternary
from inference.engine import dora

from .test_dora import IDS, make_peft_adapter


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is an optional extra: pip install -r requirements-gpu.txt")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.interpreting()


def ternary_layer(k, n, divide_scale, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    layer = BitLinear(k, n, bias=bias, divide_scale=divide_scale)
    q = torch.randint(-1, 2, (n, k), generator=gen)
    layer.weight.copy_(pack_ternary(q))
    layer.weight_scale.fill_(0.37)
    if bias:
        layer.bias.normal_(generator=gen)
    return layer, q


# M=1 and 5 take the decode tiles, 37 the prefill tiles; K and N/4 are not multiples of the blocks.
SHAPES = [(1, 100, 36), (5, 300, 132), (37, 70, 200), (1, 512, 64)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w2a8_kernel_integer_sums_are_exact(interpreter, m, k, n):
    _, q = ternary_layer(k, n, False, seed=m)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    packed = pack_ternary(q)
    # unit scales: the epilogue multiplies by 1/1, so y is the int32 accumulator itself
    y = tk.w2a8_matmul(xq, torch.ones(m), packed, torch.ones(1), divide_scale=False)
    assert torch.equal(y, (xq.long() @ q.long().T).float())


@pytest.mark.parametrize("divide_scale", [False, True], ids=["autobitlinear", "bitlinear"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w2a8_kernel_equals_the_cpu_int8_path_bit_for_bit(interpreter, divide_scale, m, k, n):
    layer, _ = ternary_layer(k, n, divide_scale, seed=m, bias=(m == 5))
    x = torch.randn(2, m, k) * 3
    with torch.inference_mode():
        got = tk.bitlinear_forward(layer, x)
        expected = layer._forward_int8(x)
    assert got.shape == (2, m, n)
    assert torch.equal(got, expected)


def test_w2a8_kernel_rounds_activation_ties_half_to_even_as_torch_round(interpreter):
    layer, _ = ternary_layer(256, 32, False)
    k = torch.arange(-127, 127, dtype=torch.float32)
    x = torch.cat([torch.ones(2), (k + 0.5) / 127])  # absmax 1: x_scale 127, products near k + 0.5
    levels = x * (torch.ones(1).reciprocal() * 127)
    assert (levels.frac().abs() == 0.5).sum() > 20  # many exact ties, where rounding modes differ
    with torch.inference_mode():
        assert torch.equal(tk.bitlinear_forward(layer, x[None]), layer._forward_int8(x[None]))


def test_w2a8_kernel_bf16_output_is_the_float32_result_rounded(interpreter):
    layer, _ = ternary_layer(96, 64, False)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        got, expected = tk.bitlinear_forward(layer, x), layer._forward_int8(x)
    assert got.dtype == torch.bfloat16
    # The GPU stores float32 -> bf16 rounding to nearest, as torch does; the interpreter's cast
    # truncates, so here the two may differ by one bf16 step (2**-7 relative).
    assert ((got.float() - expected.float()).abs() <= expected.float().abs() * 2**-7 + 1e-6).all()


# (batch, tokens, in, out, resident adapters, rank, active): decode (T=1) and prefill rows, n*r
# below and above the 32-wide J block, a rank that is no power of two, a gathered subset, and
# inputs long enough for the shrink's split-K (2, 6 and 5 chunks in the 2nd, 5th and 6th case).
MIXTURES = [(1, 1, 40, 50, 3, 4, [0, 2]), (4, 1, 130, 70, 4, 8, [0, 1, 2, 3]), (3, 7, 64, 96, 3, 3, [2, 0]),
            (2, 9, 33, 40, 5, 8, [0, 1, 3, 4]), (2, 1, 700, 40, 3, 4, [0, 1, 2]), (3, 8, 300, 40, 2, 4, [0, 1])]


@pytest.mark.parametrize("b,t,k,n,n_res,r,active", MIXTURES)
def test_dora_mixture_kernel_matches_the_pytorch_two_matmul_path(interpreter, b, t, k, n, n_res, r, active):
    gen = torch.Generator().manual_seed(b * 100 + k)
    x, y = torch.randn(b, t, k, generator=gen), torch.randn(b, t, n, generator=gen)
    flat_A, flat_B = torch.randn(n_res * r, k, generator=gen), torch.randn(n_res * r, n, generator=gen)
    active = torch.tensor(active)
    weights = torch.rand(b, active.numel(), generator=gen)
    if b > 1:
        weights[0] = 0  # a sequence that uses no adapter: only the backbone, g_mix = 1
    if b > 2:
        weights[1, 1:] = 0  # one adapter alone
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-9)
    g_mix = torch.rand(b, n, generator=gen) + 0.5
    if b > 1:
        g_mix[0] = 1
    got = tk.dora_mixture(x, y, flat_A, flat_B, r, active, weights, g_mix)
    expected = tk.dora_mixture_reference(x, y, flat_A, flat_B, r, active, weights, g_mix)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (got - y).abs().max() > 0.1  # the adapters contribute
    if b > 1:
        assert torch.equal(got[0], y[0])  # the adapter-free sequence keeps the backbone output exactly


def test_dora_mixture_kernel_bf16_matches_within_bf16_rounding(interpreter):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 5, 33, generator=gen).bfloat16(), torch.randn(4, 5, 40, generator=gen).bfloat16()
    flat_A, flat_B = torch.randn(12, 33, generator=gen).bfloat16(), torch.randn(12, 40, generator=gen).bfloat16()
    active, weights = torch.tensor([0, 1, 2]), torch.rand(4, 3, generator=gen)
    g_mix = torch.rand(4, 40, generator=gen) + 0.5
    got = tk.dora_mixture(x, y, flat_A, flat_B, 4, active, weights, g_mix)
    exact = tk.dora_mixture_reference(x.float(), y.float(), flat_A.float(), flat_B.float(), 4, active, weights, g_mix)
    pytorch_bf16 = tk.dora_mixture_reference(x, y, flat_A, flat_B, 4, active, weights, g_mix).float()
    # the kernel keeps the low-rank sums in float32, so it is at least as close to exact as PyTorch's bf16
    assert got.dtype == torch.bfloat16
    assert (got.float() - exact).abs().max() <= max((pytorch_bf16 - exact).abs().max(), 2**-7 * exact.abs().max())


def test_mixed_batch_through_both_kernels_gives_the_pytorch_logits(interpreter, tiny_llama_dir, tmp_path, monkeypatch):
    """A ternary (W2A8) tiny model with three adapters and a batch of different mixtures, one row
    without adapters: the whole forward through the Triton paths against the CPU paths."""
    from inference.engine import Engine
    from inference.engine.generate import Sequence

    engine = Engine.load(tiny_llama_dir, quant="int8", ternary=True)
    make_peft_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    make_peft_adapter(tiny_llama_dir, tmp_path / "b", seed=2, r=2, targets=("k_proj", "o_proj", "up_proj", "v_proj"))
    make_peft_adapter(tiny_llama_dir, tmp_path / "c", seed=3, targets=("q_proj", "gate_proj", "up_proj"))
    for name in "abc":
        engine.load_adapter(name, tmp_path / name)
    mixtures = [{"a": 0.5, "b": 0.3, "c": 0.2}, {"b": 1.0}, None, {"a": 0.2, "c": 0.8}]
    matrix = engine.mixture_matrix([Sequence([1], mixture=m) for m in mixtures])
    tokens = torch.tensor([IDS[:6], IDS[1:7], IDS[2:8], IDS[3:9]])
    with torch.inference_mode():
        expected = engine.model(tokens, mixture=matrix)
        decode_expected = engine.model(tokens[:, :1], mixture=matrix)
        # the CUDA routing, forced on CPU tensors
        monkeypatch.setattr(dora, "use_triton", lambda x: True)
        monkeypatch.setattr(BitLinear, "_forward_int8", tk.bitlinear_forward)
        got = engine.model(tokens, mixture=matrix)
        decode_got = engine.model(tokens[:, :1], mixture=matrix)
    assert (got - expected).abs().max().item() < 1e-4
    assert (decode_got - decode_expected).abs().max().item() < 1e-4
    assert (expected[0] - expected[2]).abs().max().item() > 1e-2  # the adapters really change the logits


def test_kernels_compile_for_h100_without_a_gpu(interpreter, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a cold compile, not a cached one
    compiled = tk.compile_for(90, torch.bfloat16)
    assert len(compiled) == 10
    for label, mma in compiled.items():  # every product runs on tensor cores: int8 for W2A8, bf16 for DoRA
        assert mma and all(("s8" if label.startswith("w2a8") else "bf16") in i for i in mma), (label, mma)


def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is an optional extra: pip install -r requirements-gpu.txt")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        tk.w2a8_matmul(torch.zeros(1, 8, dtype=torch.int8), torch.ones(1), torch.zeros(4, 8, dtype=torch.uint8),
                       torch.ones(1), divide_scale=False)


def test_engine_runs_without_triton_and_never_routes_cpu_tensors_to_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setattr(tk, "triton", None)
    monkeypatch.setattr(tk, "tl", None)
    monkeypatch.setattr(tk, "_AVAILABLE", None)
    assert not tk.available()
    layer, q = ternary_layer(64, 32, False)
    layer.int8_kernel = True
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = layer(x)
    assert torch.allclose(y, layer._forward_int8(x)) and y.shape == (3, 32)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        tk.w2a8_matmul(torch.zeros(1, 8, dtype=torch.int8), torch.ones(1), torch.zeros(4, 8, dtype=torch.uint8),
                       torch.ones(1), divide_scale=False)
