"""Engine-side work for mining: one engine per worker process, packed adapters, eval loss.

Torch is imported lazily so the web process only pays for it when it validates an upload.
"""

import json
import math
import struct
import tempfile
import threading
from pathlib import Path

from django.conf import settings

_engine = None
_engine_lock = threading.Lock()


class BadAdapterBlob(ValueError):
    pass


def get_engine():
    """The process's engine (loaded once): the configured backbone, device and dtype."""
    global _engine
    with _engine_lock:
        if _engine is None:
            import torch

            from inference.engine import Engine

            if settings.R3MES_TORCH_THREADS:
                torch.set_num_threads(settings.R3MES_TORCH_THREADS)
            _engine = Engine.load(settings.R3MES_BACKBONE or None, dtype=settings.R3MES_DTYPE,
                                  device=settings.R3MES_DEVICE, cache_dir=settings.MODEL_CACHE_DIR)
        return _engine


# -- packed adapters: one safetensors file, the PEFT config in its metadata ---------------------
def pack_dir(peft_dir) -> bytes:
    from safetensors.torch import load_file

    peft_dir = Path(peft_dir)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    return pack(load_file(str(peft_dir / "adapter_model.safetensors")), config)


def pack(state: dict, config: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()},
                metadata={"format": "pt", "adapter_config": json.dumps(config, sort_keys=True)})


def unpack(data: bytes):
    """(state dict, PEFT config) from a packed adapter, or BadAdapterBlob saying why."""
    from safetensors.torch import load

    if len(data) < 8:
        raise BadAdapterBlob("the blob is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > 100_000_000:
        raise BadAdapterBlob("the blob is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + header_len])
        config = json.loads(header.get("__metadata__", {}).get("adapter_config", "null"))
        state = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise BadAdapterBlob(f"the blob is not a readable safetensors file ({exc})") from None
    if not isinstance(config, dict):
        raise BadAdapterBlob("the safetensors metadata lacks 'adapter_config' (the PEFT adapter_config.json)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise BadAdapterBlob(f"adapter_config.{key} must be a positive number")
    return state, config


def scaling_of(config: dict) -> float:
    r, alpha = float(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def peft_config(rank, alpha, target_modules, base_model=None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": 0.0, "target_modules": sorted(target_modules),
        "use_dora": True, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def write_dir(state: dict, config: dict, path) -> Path:
    """Write a PEFT adapter directory (atomically enough: files land in place, then the config)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def unpack_to_dir(data: bytes, path) -> Path:
    state, config = unpack(data)
    return write_dir(state, config, path)


# -- evaluation ----------------------------------------------------------------------------------
def eval_loss(engine, examples, adapter=None) -> float:
    """Mean cross-entropy per response token over `examples` with `adapter` at weight 1 (None: the
    bare backbone). Uses the serving path (`engine.logits`), so it scores what would be served."""
    import torch
    import torch.nn.functional as F

    from inference.engine.train import IGNORE, encode_example, example_messages

    total, count = 0.0, 0
    for i, example in enumerate(examples[: settings.MINING_MAX_EVAL_EXAMPLES]):
        ids, labels = encode_example(engine.tokenizer, example_messages(example, i), 512, i)
        logits = engine.logits(ids, adapters={adapter: 1.0} if adapter else None)  # [T, V]
        target = torch.tensor(labels[1:])
        n = int((target != IGNORE).sum())
        if n == 0:
            continue
        total += float(F.cross_entropy(logits[:-1], target, ignore_index=IGNORE, reduction="sum"))
        count += n
    return total / count if count else float("nan")


def eval_packed(engine, data: bytes, examples, name) -> float:
    """Eval loss of a packed adapter, loaded under a temporary name and unloaded after."""
    with tempfile.TemporaryDirectory() as tmp:
        unpack_to_dir(data, tmp)
        engine.load_adapter(name, tmp)
    try:
        return eval_loss(engine, examples, name)
    finally:
        engine.unload_adapter(name)
