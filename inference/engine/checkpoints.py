"""Random BitNet b1.58 checkpoints in the real layouts, for tests and benchmarks (no hub here).

`write_random_bitnet` writes a Hugging Face directory as `microsoft/bitnet-b1.58-2B-4T` ships it:
config.json (`model_type: bitnet`, `quantization_config` with its linear class), one safetensors
file whose projections are uint8 [out/4, in] (four ternary values a byte, transformers' packing)
with a `weight_scale` each, and a bfloat16 embedding tied to the head. The tokenizer is the
caller's: any directory Tokenizer.from_dir reads.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .bitlinear import pack_ternary

# microsoft/bitnet-b1.58-2B-4T's body
SHAPES_2B4T = {"dim": 2560, "n_layers": 30, "n_heads": 20, "n_kv_heads": 5, "hidden_dim": 6912, "vocab_size": 128256,
               "max_seq_len": 4096}


def random_ternary(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """int8 {-1, 0, 1} with BitNet's typical share of zeros (about a third)."""
    return torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8, generator=gen)


def write_random_bitnet(path: str | Path, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int,
                        vocab_size: int, max_seq_len: int = 2048, seed: int = 0, linear_class: str = "autobitlinear",
                        eos_token_id: int | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    head_dim = dim // n_heads
    state = {"model.embed_tokens.weight": (torch.randn(vocab_size, dim, generator=gen) * 0.02).to(torch.bfloat16),
             "model.norm.weight": torch.rand(dim, generator=gen).add_(0.5).to(torch.bfloat16)}
    shapes = {"self_attn.q_proj": (n_heads * head_dim, dim), "self_attn.k_proj": (n_kv_heads * head_dim, dim),
              "self_attn.v_proj": (n_kv_heads * head_dim, dim), "self_attn.o_proj": (dim, n_heads * head_dim),
              "mlp.gate_proj": (hidden_dim, dim), "mlp.up_proj": (hidden_dim, dim), "mlp.down_proj": (dim, hidden_dim)}
    norms = {"input_layernorm": dim, "post_attention_layernorm": dim, "self_attn.attn_sub_norm": n_heads * head_dim,
             "mlp.ffn_sub_norm": hidden_dim}
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        for name, (n_out, n_in) in shapes.items():
            state[prefix + name + ".weight"] = pack_ternary(random_ternary(n_out, n_in, gen))
            # absmean of a weight whose ternary rounding this is: ~1/sqrt(n_in) keeps activations in range
            scale = torch.tensor([(1.0 / n_in ** 0.5) * (0.8 + 0.4 * torch.rand((), generator=gen).item())])
            state[prefix + name + ".weight_scale"] = (scale if linear_class == "autobitlinear" else 1 / scale).to(
                torch.bfloat16)
        for name, n in norms.items():
            state[prefix + name + ".weight"] = torch.rand(n, generator=gen).add_(0.5).to(torch.bfloat16)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": vocab_size,
        "hidden_size": dim, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "intermediate_size": hidden_dim, "head_dim": head_dim,
        "hidden_act": "relu2", "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": max_seq_len,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "eos_token_id": eos_token_id,
        "quantization_config": {"quant_method": "bitnet", "linear_class": linear_class,
                                "quantization_mode": "offline"},
        "_name_or_path": f"random-bitnet-{n_layers}x{dim}",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
