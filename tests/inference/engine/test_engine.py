import ast
from pathlib import Path

import pytest
import torch

import inference.engine as engine_pkg
from inference.engine import Engine, EngineError

ENGINE_DIR = Path(engine_pkg.__file__).parent


def test_engine_package_never_imports_django():
    for path in ENGINE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "django" for n in names), f"{path.name} imports django"


def test_capabilities_report_device_precision_backend_and_model(engine):
    caps = engine.capabilities()
    assert caps["device"] == "cpu" and caps["backend"] == "pytorch-cpu"
    assert caps["dtype"] == caps["precision"] == "float32"
    assert caps["int4_kernel"] is None  # no int4 products in this mode
    assert caps["arch"] == "llama" and caps["ternary"] is False and caps["weights"] == "dense"
    assert caps["context_length"] == 8192 and caps["vocab_size"] == 49152
    assert 130e6 < caps["n_params"] < 140e6  # SmolLM2-135M, tied embeddings counted once
    assert "Smollm2 135M" in caps["model"]
    assert caps["memory"]["ram_total_bytes"] > 0 and caps["memory"]["weights_bytes"] > 0


def test_tokenize_and_detokenize_round_trip(engine):
    ids = engine.tokenize("R3MES serves DoRA experts.")
    assert all(isinstance(i, int) for i in ids)
    assert engine.detokenize(ids) == "R3MES serves DoRA experts."


def test_bad_dtype_device_and_token_ids_raise_engine_error(engine, tiny_llama_dir):
    with pytest.raises(EngineError, match="int3"):
        Engine.load(tiny_llama_dir, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="cuda"):
            Engine.load(tiny_llama_dir, device="cuda")
    with pytest.raises(EngineError, match="49152"):
        engine.logits([1, 49152])
