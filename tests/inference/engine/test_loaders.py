import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from inference.engine import Engine, ModelLoadError, UnsupportedArchitecture, UnsupportedTensorType
from inference.engine.loaders import prepare_default_model

from .conftest import make_tiny_llama, tiny_tokens

# One tensor per type; Q4_K and Q6_K have no numpy quantiser in gguf, so those get raw blocks.
LAYER_TYPES = [
    {"attn_q": Q.F16, "attn_k": Q.BF16, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.TQ1_0, "ffn_down": Q.TQ2_0},
    {"attn_q": Q.Q4_K, "attn_k": Q.Q6_K, "attn_v": Q.F32, "attn_output": Q.Q8_0,
     "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F16},
]
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def raw_k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin lead the block
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K: d trails the block
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def write_tiny_gguf(hf_dir, out, layer_types=LAYER_TYPES, arch="llama", output_type=Q.F16):
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tiny_tokens())
    w.add_token_types([1] * 256 + [3] * (len(tiny_tokens()) - 256))
    w.add_token_merges([])
    w.add_eos_token_id(258)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", gguf.quants.quantize(state["lm_head.weight"], output_type), raw_dtype=output_type)
    for i, types in enumerate(layer_types):
        w.add_tensor(f"blk.{i}.attn_norm.weight", state[f"model.layers.{i}.input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", state[f"model.layers.{i}.post_attention_layernorm.weight"])
        for name, qtype in types.items():
            t = state[f"model.layers.{i}.{HF_NAMES[name]}.weight"]
            if name == "attn_q":
                t = permute(t, n_heads)
            elif name == "attn_k":
                t = permute(t, n_kv)
            if qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_K):
                w.add_tensor(f"blk.{i}.{name}.weight", raw_k_blocks(*t.shape, qtype, rng), raw_dtype=qtype)
            else:
                w.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def gguf_dims_llama(tmp_path_factory):
    # 256-wide rows: K-quants and TQ types need 256-value blocks
    return make_tiny_llama(tmp_path_factory.mktemp("llama256"), hidden_size=256, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2)


def test_gguf_with_every_common_type_matches_transformers_gguf_loader(gguf_dims_llama, tmp_path):
    from transformers import LlamaForCausalLM

    path = write_tiny_gguf(gguf_dims_llama, tmp_path / "mixed.gguf")
    ref = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    engine = Engine.load(path)
    ids = [3, 40, 77, 120, 200, 17, 9, 250]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (engine.logits(ids) - expected).abs().max().item() < 1e-3


def test_gguf_q_k_permutation_is_undone(gguf_dims_llama, tmp_path):
    """All-F32 GGUF written the llama.cpp way must give back the original HF model exactly."""
    f32 = [{k: Q.F32 for k in HF_NAMES}] * 2
    engine = Engine.load(write_tiny_gguf(gguf_dims_llama, tmp_path / "f32.gguf", f32, output_type=Q.F32))
    original = Engine.load(gguf_dims_llama)
    ids = list(range(30, 60))
    assert (engine.logits(ids) - original.logits(ids)).abs().max().item() < 1e-5


def test_unsupported_gguf_tensor_type_raises_error_naming_tensor_and_type(gguf_dims_llama, tmp_path):
    types = [dict(LAYER_TYPES[0], ffn_down=Q.Q8_K), LAYER_TYPES[1]]
    path = write_tiny_gguf(gguf_dims_llama, tmp_path / "q8k.gguf", types)
    with pytest.raises(UnsupportedTensorType, match=r"blk\.0\.ffn_down\.weight.*Q8_K"):
        Engine.load(path)


def test_unsupported_gguf_architecture_raises_typed_error(gguf_dims_llama, tmp_path):
    path = write_tiny_gguf(gguf_dims_llama, tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(UnsupportedArchitecture, match="gemma"):
        Engine.load(path)


def test_truncated_gguf_raises_model_load_error(default_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as src:
        path.write_bytes(src.read(3_000_000))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        Engine.load(path)


def test_missing_and_non_model_files_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="nothing.gguf"):
        Engine.load(tmp_path / "nothing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("these are not weights")
    with pytest.raises(ModelLoadError, match="notes.gguf"):
        Engine.load(text)
    with pytest.raises(ModelLoadError, match="config.json"):
        Engine.load(tmp_path)


def test_hf_dir_with_truncated_safetensors_raises_model_load_error(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Engine.load(broken)


def test_hf_dir_missing_tensor_or_wrong_arch_names_the_problem(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Engine.load(broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="mistral"):
        Engine.load(broken)


def test_tokenizer_from_gguf_matches_transformers(engine, default_gguf):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    for text in ["Hello world, héllo 123", " 42 apples\n\n  x", "<|im_start|>user\nhi<|im_end|>",
                 "日本語 emoji 🤖 ok", "def f(x):\n\treturn x**2  # done"]:
        assert engine.tokenize(text) == ref(text, add_special_tokens=False)["input_ids"]
        assert engine.detokenize(engine.tokenize(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert engine.tokenizer.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_default_model_is_converted_once_then_reused(engine, model_cache):
    converted = prepare_default_model(model_cache)
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(converted))
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    assert prepare_default_model(model_cache) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime
    assert engine.source == str(converted)


def test_prepare_command_prints_the_model_location(model_cache, capsys):
    from inference.engine.prepare import main

    assert main(["--cache-dir", str(model_cache)]) == 0
    assert str(model_cache.resolve()) in capsys.readouterr().out
