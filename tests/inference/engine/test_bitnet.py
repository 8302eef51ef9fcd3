import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.engine import Engine
from inference.engine.bitlinear import BitLinear, pack_ternary, quantize_activations, unpack_ternary

from .conftest import TINY_VOCAB, write_tiny_tokenizer


def make_tiny_bitnet(path, linear_class="autobitlinear", seed=0):
    """A random BitNet b1.58 checkpoint saved by transformers, then packed the 2B-4T way."""
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import pack_weights

    cfg = BitNetConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=258, pad_token_id=None)
    torch.manual_seed(seed)
    model = BitNetForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    for key in [k for k in state if k.endswith("proj.weight")]:
        w = state[key].float()
        scale = w.abs().mean().clamp(min=1e-5)
        state[key] = pack_weights((w / scale).round().clamp(-1, 1))
        # "autobitlinear" (the 2B-4T checkpoint) multiplies by weight_scale, "bitlinear" divides.
        state[key.replace(".weight", ".weight_scale")] = (scale if linear_class == "autobitlinear" else 1 / scale).reshape(1)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                     "quantization_mode": "offline"}
    (path / "config.json").write_text(json.dumps(config))
    write_tiny_tokenizer(path)
    return path


def test_pack_layout_matches_transformers_bitnet_pack_and_unpack(no_dynamo):
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    q = torch.randint(-1, 2, (32, 24))
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 24)
    assert torch.equal(packed, pack_weights(q.clone().float()))
    assert torch.equal(unpack_ternary(packed), q.float())
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), q.float())


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_float32_logits_match_transformers_bitnet_packed_checkpoint(tmp_path, no_dynamo, linear_class):
    from transformers import BitNetForCausalLM

    path = make_tiny_bitnet(tmp_path, linear_class)
    ref = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = Engine.load(path)
    caps = engine.capabilities()
    assert caps["arch"] == "bitnet" and caps["ternary"] and not caps["ternarized_from_dense"]
    q_proj = engine.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, BitLinear) and q_proj.weight.dtype == torch.uint8 and q_proj.weight.shape == (16, 64)
    ids = [7, 99, 3, 250, 18, 42, 42, 1, 130, 77, 5, 9]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (engine.logits(ids) - expected).abs().max().item() < 1e-3


def test_bitnet_kv_cache_generation_matches_full_forward_argmax(tmp_path):
    engine = Engine.load(make_tiny_bitnet(tmp_path))
    list(engine.generate("abc", max_tokens=8))
    seq = engine.last_sequence
    full = engine.logits(seq.prompt_ids + seq.output_ids)
    n = len(seq.prompt_ids)
    assert full[n - 1 : -1].argmax(-1).tolist()[: len(seq.output_ids)] == seq.output_ids


def test_dense_weight_is_the_dequantised_ternary_matrix():
    linear = torch.nn.Linear(16, 8, bias=False)
    layer = BitLinear.from_dense(linear)
    w0 = layer.dense_weight()
    scale = linear.weight.abs().mean()
    assert torch.allclose(layer.weight_scale, scale.reshape(1))
    assert set((w0 / scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(w0 / scale, (linear.weight / scale).round().clamp(-1, 1))


def test_bitlinear_quantises_activations_per_token_to_int8_levels():
    x = torch.randn(3, 5, 32)
    xq = quantize_activations(x)
    levels = xq * 127 / x.abs().amax(-1, keepdim=True)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= 127.0 + 1e-4


def test_straight_through_estimator_passes_gradient_to_inputs():
    layer = BitLinear.from_dense(torch.nn.Linear(32, 16))
    x = torch.randn(2, 32, requires_grad=True)
    layer(x).sum().backward()
    # d/dx of sum(W x) through STE is the column sum of the dequantised W, not zero
    expected = layer.dense_weight().sum(0).expand(2, -1)
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_ternary_load_option_ternarises_a_dense_llama_and_says_so(tiny_llama_dir):
    engine = Engine.load(tiny_llama_dir, ternary=True)
    caps = engine.capabilities()
    assert caps["ternary"] and caps["ternarized_from_dense"] and "ternary" in caps["weights"]
    layer = engine.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, BitLinear)
    # 2 bits per weight: one byte holds four weights
    assert layer.weight.numel() == layer.in_features * layer.out_features // 4
    assert torch.isfinite(engine.logits([1, 2, 3])).all()
