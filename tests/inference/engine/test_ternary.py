"""The packed ternary kernel (ternary.cpp) and BitNet b1.58 served with the defaults."""

import gguf
import numpy as np
import pytest
import torch

from inference.engine import Engine, QuantModeError
from inference.engine import loaders, ternary
from inference.engine.bitlinear import BitLinear, pack_ternary
from inference.engine.checkpoints import write_random_bitnet
from inference.engine.errors import UnsupportedTensorType
from inference.engine.speed import Int4Linear, linear_weight_bits
from inference.engine.ternary import TernaryLinear

from .conftest import TINY_VOCAB, write_tiny_tokenizer
from .test_bitnet import make_tiny_bitnet

needs_kernel = pytest.mark.skipif(ternary.kernel() is None, reason="this CPU has neither AVX512-VNNI nor AVX2")


def exact_product(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's definition in PyTorch: transformers' int8 levels, integer sums in int64."""
    x_scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = (x * x_scale).round().clamp(-128, 127).long()
    acc = q @ t.long().t()
    return acc.float() * (scale[None, :] / x_scale)


ISAS = [None, "avx2"]


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k", [(1, 16, 16), (1, 48, 64), (2, 40, 70), (3, 100, 33), (5, 64, 2560), (8, 32, 512),
                                   (9, 256, 160), (17, 20, 20), (1, 3840, 2560), (2, 2560, 6912), (1, 4, 1)])
def test_kernel_equals_the_exact_integer_product_on_every_shape(isa, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    t = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) + 0.1
    layer = TernaryLinear.from_ternary(t, scale)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, 0] = 50.0  # one outlier: many levels round to zero
    y = torch.ops.r3mes_ternary.ternary_mm(x, layer.weight, layer.scale, isa or "")[:, :n]
    assert torch.equal(y, exact_product(x, t, scale))


@needs_kernel
def test_kernel_rejects_wrong_shapes_and_unknown_instruction_sets():
    layer = TernaryLinear.from_ternary(torch.zeros(16, 32, dtype=torch.int8), torch.ones(16))
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.r3mes_ternary.ternary_mm(torch.randn(1, 64), layer.weight, layer.scale)
    with pytest.raises(RuntimeError, match="cannot run the 'neon' kernel"):
        torch.ops.r3mes_ternary.ternary_mm(torch.randn(1, 32), layer.weight, layer.scale, "neon")


def test_pack_round_trips_and_row_views_share_the_storage():
    t = torch.randint(-1, 2, (48, 40), dtype=torch.int8)
    layer = TernaryLinear.from_ternary(t, torch.arange(48).float())
    assert layer.weight.shape == (3, 3, 64) and layer.weight.dtype == torch.uint8
    assert torch.equal(ternary.unpack(layer.weight, 48, 40), t)
    view = layer.rows(16, 48)
    assert view.weight.data_ptr() == layer.weight[1:].data_ptr()
    assert torch.equal(view.ternary(), t[16:])
    assert torch.equal(view.dense_weight(), t[16:].float() * torch.arange(16, 48).float()[:, None])
    with pytest.raises(ValueError, match="16-row blocks"):
        layer.rows(8, 24)


def test_without_the_kernel_pytorch_gives_the_same_numbers(monkeypatch):
    t, scale = torch.randint(-1, 2, (40, 70), dtype=torch.int8), torch.rand(40)
    layer = TernaryLinear.from_ternary(t, scale)
    x = torch.randn(3, 70)
    ternary.kernel.cache_clear()
    try:
        with monkeypatch.context() as patch:
            patch.setenv("R3MES_TERNARY_KERNEL", "aten")
            unkernelled = TernaryLinear.from_ternary(t, scale)
    finally:
        ternary.kernel.cache_clear()
    assert unkernelled.isa is None
    with torch.inference_mode():
        fast, slow = layer(x), unkernelled(x)
    assert torch.equal(slow, exact_product(x, t, scale))
    if layer.isa is not None:
        assert torch.equal(fast, slow)


def test_training_through_a_ternary_layer_uses_the_straight_through_float_product():
    t = torch.randint(-1, 2, (16, 32), dtype=torch.int8)
    layer = TernaryLinear.from_ternary(t, torch.full((16,), 0.5))
    x = torch.randn(2, 32, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dense_weight().sum(0).expand(2, -1), atol=1e-6)


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_auto_serves_a_bitnet_checkpoint_packed_with_the_int8_path_numbers(tmp_path, no_dynamo, linear_class):
    path = make_tiny_bitnet(tmp_path, linear_class)
    served = Engine.load(path, quant="auto")
    reference = Engine.load(path, quant="int8")  # BitLinear unpacked per call: the same integer sums
    model = served.model
    assert model.quant == "ternary"
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, TernaryLinear) and isinstance(mlp.gate_up_proj, TernaryLinear)
    assert isinstance(model.lm_head, Int4Linear)
    assert not any(isinstance(m, BitLinear) for m in model.modules())  # the checkpoint's packing is gone
    # the head is int4 in the served model: compare the last hidden states through the same head
    reference.model.lm_head = model.lm_head
    ids = [7, 99, 3, 250, 18, 42, 42, 1, 130, 77, 5, 9]
    got, want = served.logits(ids), reference.logits(ids)
    tolerance = 1e-5 if linear_class == "autobitlinear" else 1e-3  # 1 / scale rounds differently
    assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()


def test_capabilities_and_summary_say_what_runs(tmp_path, no_dynamo):
    engine = Engine.load(make_tiny_bitnet(tmp_path), quant="auto")
    caps = engine.capabilities()
    assert caps["ternary"] and caps["quant"] == "ternary"
    assert caps["ternary_kernel"] == (ternary.kernel() or "pytorch")
    assert caps["serving"].startswith("BitNet b1.58, ternary, 2-bit packed, ")
    assert caps["serving"].endswith("kernel, int4 head")
    exact = Engine.load(make_tiny_bitnet(tmp_path / "exact"))
    assert exact.capabilities()["ternary_kernel"] is None
    assert "reference path" in exact.capabilities()["serving"]


def test_a_mode_that_does_not_fit_the_checkpoint_is_an_error_naming_it(tmp_path, tiny_llama_dir):
    with pytest.raises(QuantModeError, match="quant='int4' applies to dense checkpoints"):
        Engine.load(make_tiny_bitnet(tmp_path), quant="int4")
    with pytest.raises(QuantModeError, match="quant='ternary' runs ternary"):
        Engine.load(tiny_llama_dir, quant="ternary")
    assert Engine.load(tiny_llama_dir, quant="auto").model.quant == "int4"


def test_batched_rows_equal_each_sequence_alone(tmp_path, no_dynamo):
    engine = Engine.load(make_tiny_bitnet(tmp_path), quant="auto")
    prompts = ["abc", "hello there", "xyz xyz", "a", "the quick brown fox"]
    alone = []
    for p in prompts:
        list(engine.generate(p, max_tokens=6, ignore_eos=True))
        alone.append(engine.last_sequence.output_ids)
    batch = engine.new_batch(max_batch=8, max_seq_len=128)
    seqs = [engine.sequence(p, max_tokens=6, ignore_eos=True) for p in prompts]
    for s in seqs:
        batch.add(s)
    while len(batch):
        batch.step()
    assert [s.output_ids for s in seqs] == alone


def test_dora_experts_mix_on_the_packed_backbone_as_on_the_reference(tmp_path, no_dynamo):
    path = make_tiny_bitnet(tmp_path / "model")
    engines = {"served": Engine.load(path, quant="auto"), "reference": Engine.load(path, quant="int8")}
    engines["reference"].model.lm_head = engines["served"].model.lm_head
    for engine in engines.values():
        for i, name in enumerate(("a", "b", "c")):
            engine.new_adapter(name, r=4, alpha=8, seed=i)
            with torch.no_grad():  # B = 0 would make the mixture the identity
                for module in engine.model.modules():
                    if hasattr(module, "lora_B") and name in module.lora_B:
                        module.lora_B[name].normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
                        module.rebuild()
    mixture = {"a": 0.5, "b": 0.3, "c": 0.2}
    ids = [7, 99, 3, 250, 18, 42]
    got = engines["served"].logits(ids, adapters=mixture)
    want = engines["reference"].logits(ids, adapters=mixture)
    plain = engines["served"].logits(ids)
    assert (got - plain).abs().max() > 1e-2  # the experts change the answer
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_2b4t_shaped_checkpoint_keeps_two_bits_a_weight_resident(tmp_path):
    # the 2B-4T body's widths, two layers and a small vocabulary
    path = write_random_bitnet(tmp_path, dim=2560, n_layers=2, n_heads=20, n_kv_heads=5, hidden_dim=6912,
                               vocab_size=TINY_VOCAB, eos_token_id=258)
    write_tiny_tokenizer(path)
    engine = Engine.load(path, quant="auto")
    assert linear_weight_bits(engine.model) <= 2.1
    list(engine.generate("abc", max_tokens=3, ignore_eos=True))
    assert len(engine.last_sequence.output_ids) == 3


# -- ternary GGUF files ----------------------------------------------------------------------------
def write_ternary_gguf(path, qtype, arch="llama", vary_scales=False, seed=0):
    """A small model (width 256: TQ blocks are 256 inputs) whose seven projections are `qtype`,
    written with gguf.quants; returns the path and each projection's ternary matrix and scale."""
    from .conftest import tiny_tokens

    dim, hidden, heads, kv_heads, layers = 256, 512, 4, 2, 2
    gen = torch.Generator().manual_seed(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tiny_tokens())
    w.add_token_merges([])
    w.add_eos_token_id(258)
    w.add_tensor("token_embd.weight", (torch.randn(TINY_VOCAB, dim, generator=gen) * 0.1).numpy())
    w.add_tensor("output_norm.weight", torch.ones(dim).numpy())
    shapes = {"attn_q": (dim, dim), "attn_k": (dim // heads * kv_heads, dim), "attn_v": (dim // heads * kv_heads, dim),
              "attn_output": (dim, dim), "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim), "ffn_down": (dim, hidden)}
    written = {}
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", torch.ones(dim).numpy())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", torch.ones(dim).numpy())
        if arch == "bitnet":
            w.add_tensor(f"blk.{i}.attn_sub_norm.weight", torch.ones(dim).numpy())
            w.add_tensor(f"blk.{i}.ffn_sub_norm.weight", torch.ones(hidden).numpy())
        for name, shape in shapes.items():
            t = torch.randint(-1, 2, shape, dtype=torch.int8, generator=gen)
            scale = 0.05 + 0.01 * i
            values = t.float() * scale
            if vary_scales:
                values[0] *= 2
            w.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(values.numpy(), qtype), raw_dtype=qtype)
            written[f"blk.{i}.{name}"] = (t, scale)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, written


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.TQ2_0, gguf.GGMLQuantizationType.TQ1_0])
@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_ternary_gguf_loads_packed_and_never_through_float32(tmp_path, monkeypatch, qtype, arch):
    real = loaders.dequantize_gguf_tensor

    def no_ternary_dequantising(tensor, source):
        assert tensor.tensor_type.name not in loaders.TERNARY_GGUF_TYPES, f"{tensor.name} went through float32"
        return real(tensor, source)

    monkeypatch.setattr(loaders, "dequantize_gguf_tensor", no_ternary_dequantising)
    path, written = write_ternary_gguf(tmp_path / f"{arch}.gguf", qtype, arch)
    engine = Engine.load(path, quant="auto")
    assert engine.config.ternary and engine.model.quant == "ternary"
    layer = engine.model.model.layers[1]
    t, scale = written["blk.1.attn_k"]
    expected = loaders.reverse_permute(t.numpy(), 2) if arch == "llama" else t.numpy()
    assert torch.equal(layer.self_attn.k_proj.ternary(), torch.from_numpy(expected))
    assert torch.allclose(layer.self_attn.k_proj.scale, torch.tensor(scale), rtol=1e-3)  # float16 in the file
    t, _ = written["blk.1.ffn_down"]
    assert torch.equal(layer.mlp.down_proj.ternary(), t)
    list(engine.generate("abc", max_tokens=4, ignore_eos=True))
    assert len(engine.last_sequence.output_ids) == 4


def test_tq_gguf_whose_block_scales_differ_is_dequantised_as_a_dense_model(tmp_path):
    path, _ = write_ternary_gguf(tmp_path / "dense.gguf", gguf.GGMLQuantizationType.TQ2_0, vary_scales=True)
    engine = Engine.load(path, quant="auto")
    assert not engine.config.ternary and engine.model.quant == "int4"


def test_gguf_with_bitnet_cpp_i2_s_tensors_is_refused_naming_the_formats_that_work(tmp_path):
    path, _ = write_ternary_gguf(tmp_path / "i2s.gguf", gguf.GGMLQuantizationType.TQ2_0)
    data = bytearray(path.read_bytes())
    # the first projection's tensor info: name, n_dims (u32), dims (u64 each), type (u32)
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == gguf.GGMLQuantizationType.TQ2_0
    data[type_at:type_at + 4] = (36).to_bytes(4, "little")  # bitnet.cpp's I2_S
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedTensorType, match="I2_S.*TQ1_0 or TQ2_0"):
        Engine.load(path)


def test_bitnet_2b4t_packing_in_the_checkpoint_matches_transformers():
    from transformers.integrations.bitnet import pack_weights

    q = torch.randint(-1, 2, (64, 48))
    assert torch.equal(pack_ternary(q), pack_weights(q.clone().float()))
    assert np.array_equal(ternary.unpack(ternary.pack(q), 64, 48).numpy(), q.numpy())
