"""Our int4 kernel (inference/engine/int4mm.cpp) against PyTorch's on the same quantised numbers,
its fused DoRA groups against the product followed by dora.add_lowrank, and the errors it gives.

The kernel needs AVX512-BF16: on a CPU without it these tests skip (the engine then runs PyTorch's
kernel, which test_speed_modes covers) -- they cannot run there, nothing is mocked."""

import pytest
import torch

from inference.engine import Engine, dora, int4mm
from inference.engine.speed import Int4Linear

pytestmark = pytest.mark.skipif(not int4mm.available(), reason="this CPU has no AVX512-BF16 (int4mm.cpp)")


def quantised(n_out: int, n_in: int, seed: int = 0):
    """q in 0..15, bfloat16 scales and zeros per group of 32, as Int4Linear.from_weight makes them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n_out, n_in), generator=gen)
    scale = (torch.rand(n_out, n_in // 32, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zero = (torch.randn(n_out, n_in // 32, generator=gen) * 0.01).to(torch.bfloat16)
    return q, scale, zero


def pytorch_int4(x: torch.Tensor, q, scale, zero) -> torch.Tensor:
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)


def test_pack_int4_round_trips_the_quantised_numbers():
    q, scale, zero = quantised(64, 96)
    w = int4mm.pack_int4(q, scale, zero)
    assert w.shape == (4, 3, int4mm.BLOCK_BYTES) and w.dtype == torch.uint8  # 2.5 bytes per 4 weights
    back = int4mm.unpack_int4(w)
    assert torch.equal(back[0], q) and torch.equal(back[1], scale) and torch.equal(back[2], zero)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 20])
@pytest.mark.parametrize("shape", [(96, 64), (48, 160)])
def test_int4_kernel_gives_pytorch_int4_kernel_results(rows, shape):
    """Both sum in float32 in another order, then round to bfloat16: at most a last bit apart."""
    q, scale, zero = quantised(*shape, seed=rows)
    x = torch.randn(rows, shape[1]).to(torch.bfloat16)
    ours = int4mm.int4_mm(x, int4mm.pack_int4(q, scale, zero))
    ref = pytorch_int4(x, q, scale, zero)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2 ** -7, atol=1e-4)
    # the exact product of the dequantised weights, in float64
    w = ((q.double() - 8).view(shape[0], -1, 32) * scale.double()[..., None] + zero.double()[..., None]).view(shape)
    torch.testing.assert_close(ours.double(), x.double() @ w.t(), rtol=2 ** -7, atol=1e-4)


def test_int4_linear_on_our_kernel_equals_it_on_pytorchs(monkeypatch):
    weight = torch.randn(80, 64)
    ours = Int4Linear.from_weight(weight)
    monkeypatch.setattr(int4mm, "available", lambda: False)
    theirs = Int4Linear.from_weight(weight)
    assert ours.on_int4mm and not theirs.on_int4mm
    assert ours.out_features == theirs.out_features == 80  # padded to 96 rows inside, cut back
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=2 ** -7, atol=1e-4)
    # ours unpacks exactly; PyTorch's layout is read back through a product, rounded to bfloat16
    torch.testing.assert_close(ours.dense_weight(), theirs.dense_weight(), rtol=2 ** -8, atol=1e-6)
    # a row view on whole blocks of 16 shares storage and answers the same rows
    part = ours.rows(16, 48)
    assert part.weight.data_ptr() == ours.weight[1].data_ptr()
    torch.testing.assert_close(part(x), ours(x)[:, 16:48])
    with pytest.raises(ValueError, match="16-row blocks"):
        ours.rows(8, 40)


def test_engine_reports_which_kernel_runs_its_int4_products(tiny_llama_dir, monkeypatch):
    assert Engine.load(tiny_llama_dir, quant="int4").capabilities()["int4_kernel"] == "avx512-bf16"
    monkeypatch.setattr(int4mm, "available", lambda: False)  # as on a CPU without AVX512-BF16
    assert Engine.load(tiny_llama_dir, quant="int4").capabilities()["int4_kernel"] == "pytorch"


def packed_group(sizes, n_in, width, rows, layers=2, seed=0):
    """One DoRA group's factors packed as dora.pack_lowrank lays them out, a layer after another
    (another group's factors follow, as in a real step), with g and the rows' mixture weights."""
    gen = torch.Generator().manual_seed(seed)
    n_out, p = sum(sizes), len(sizes)
    per_layer = p * width * n_in + n_out * width + 96 * width  # A, B, then the next group's
    F = (torch.randn(layers, width, per_layer // width, generator=gen) * 0.05).to(torch.bfloat16)
    G = 1 + 0.1 * torch.randn(layers, 1, n_out + 64, generator=gen)
    if rows is None:
        return F, G, None
    return F, 1 + 0.1 * torch.randn(layers, rows, 1, n_out + 64, generator=gen), torch.rand(rows, p + 1, width)


@pytest.mark.parametrize("rows", [None, 1, 3, 8])
@pytest.mark.parametrize("sizes,n_in", [((64, 32, 32), 64), ((96,), 64), ((64,), 128)])
def test_fused_group_equals_backbone_product_then_add_lowrank(rows, sizes, n_in):
    """rows None: a lone sequence (the mixture weight folded into B); else a batch, each row its
    own weights. Both sum the low-rank paths in float32; the backbone output is the same bits."""
    width = 24
    lin = Int4Linear.from_weight(torch.randn(sum(sizes), n_in) * 0.05)
    F, G, Wt = packed_group(sizes, n_in, width, rows)
    x = torch.randn(rows or 1, 1, n_in)
    for layer in range(2):
        # the group starts at the layer's start in F; its g after 64 other columns of G;
        # its rows' weights after one other projection's
        group = (F, layer * F.stride(0), G, layer * G.stride(0) + 64, Wt, width)
        fused = dora.lowrank_product(lin, x, group, sizes)
        views = dora.lowrank_views(group, len(sizes), n_in, sum(sizes))
        ref = dora.add_lowrank(x, lin(x), *views, sizes=sizes if len(sizes) > 1 else None)
        assert fused.shape == ref.shape
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        # and the low-rank part is really there: without it the outputs differ
        assert not torch.allclose(fused, lin(x) * views[2], rtol=1e-3, atol=1e-3)


def test_kernel_rejects_bad_inputs_with_clear_errors():
    q, scale, zero = quantised(32, 64)
    w = int4mm.pack_int4(q, scale, zero)
    with pytest.raises(RuntimeError, match="2-d bfloat16"):
        int4mm.int4_mm(torch.randn(2, 64), w)
    with pytest.raises(RuntimeError, match="x has 96 inputs, the weight 64"):
        int4mm.int4_mm(torch.randn(2, 96).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="multiples of 16"):
        int4mm.pack_int4(q[:24], scale[:24], zero[:24])
    F, G, _ = packed_group((32,), 64, 8, None, layers=1)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="overrun F"):
        int4mm.int4_mm_lowrank(x, w, F, F.numel() - 10, G, 0, None, 0, [32])
    with pytest.raises(RuntimeError, match="sizes sum to 64"):
        int4mm.int4_mm_lowrank(x, w, F, 0, G, 0, None, 0, [32, 32])
    with pytest.raises(ValueError, match="1-3 projections, got 4"):
        int4mm.int4_mm_lowrank(x, w, F, 0, G, 0, None, 0, [32, 32, 32, 32])
    with pytest.raises(RuntimeError, match="1-3 positive output widths"):
        torch.ops.r3mes.int4_mm_lowrank(x, w, F, 0, G, 0, G, -1, 32, 0, 32)
    with pytest.raises(RuntimeError, match="g overruns G"):
        int4mm.int4_mm_lowrank(x, w, F, 0, G, G.numel() - 8, None, 0, [32])
