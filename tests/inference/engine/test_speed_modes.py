"""Speed work keeps the engine exact: fused projections, the static KV cache's fast paths, the
weight-only int8/int4 modes (each within its stated bound), the packed ternary int8 kernel, and
mixtures/batching in every mode."""

import pytest
import torch

from inference.engine import Engine, EngineError
from inference.engine.bitlinear import BitLinear, pack_ternary, unpack_ternary, unpack_ternary_int8
from inference.engine.generate import Sequence, decode_one_token, prefill
from inference.engine.model import ModelConfig, Transformer
from inference.engine.speed import Int4Linear, Int8Linear, linear_weight_bits

from .test_dora import IDS, make_peft_adapter

# Stated quality bounds against float32 on the default model (benchmarks/RESULTS.md, "Engine speed").
KL_BOUND = {"int8": 0.02, "int4": 0.1}
# Batched vs alone within one mode: float32 is exact up to summation order; the bf16-activation
# kernels of the int modes and bf16 round per row, so a different batch shape may move the last bits.
BATCH_TOL = {None: 1e-4, "bfloat16": 0.1, "int8": 0.05, "int4": 0.05}
QUALITY_TEXTS = ["The capital of France is Paris, and the capital of Germany is",
                 "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]


def mean_kl(got: torch.Tensor, ref: torch.Tensor) -> float:
    return torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1).mean().item()


@pytest.fixture
def adapters(tiny_llama_dir, tmp_path):
    make_peft_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    make_peft_adapter(tiny_llama_dir, tmp_path / "b", seed=2, r=2, targets=("k_proj", "o_proj", "up_proj", "v_proj"))
    make_peft_adapter(tiny_llama_dir, tmp_path / "c", seed=3, targets=("q_proj", "gate_proj", "up_proj"))
    return {n: tmp_path / n for n in "abc"}


def load_tiny(tiny_llama_dir, mode, adapters=None, fuse=True):
    dtype = "bfloat16" if mode == "bfloat16" else "float32"
    engine = Engine.load(tiny_llama_dir, dtype=dtype, quant=None if mode == "bfloat16" else mode, fuse=fuse)
    for name, path in (adapters or {}).items():
        engine.load_adapter(name, path)
    return engine


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_fused_projections_give_the_same_logits_as_unfused(tiny_llama_dir, adapters, mode):
    fused, plain = load_tiny(tiny_llama_dir, mode, adapters), load_tiny(tiny_llama_dir, mode, adapters, fuse=False)
    assert fused.model.model.layers[0].self_attn.qkv_proj is not None
    assert plain.model.model.layers[0].self_attn.qkv_proj is None
    for mixture in (None, {"a": 0.5, "b": 0.3, "c": 0.2}):
        assert (fused.logits(IDS, adapters=mixture) - plain.logits(IDS, adapters=mixture)).abs().max().item() < 1e-5
    assert fused.capabilities()["n_params"] == plain.capabilities()["n_params"]
    if mode != "int4":  # (int4 views need whole 64-row blocks; the tiny model's k/v rows are copies)
        # q/k/v are row views of the fused weight: no second copy of the backbone
        attn = fused.model.model.layers[0].self_attn
        k_storage = attn.k_proj.base_layer.weight.untyped_storage().data_ptr()
        assert k_storage == attn.qkv_proj.weight.untyped_storage().data_ptr()
        assert fused.capabilities()["memory"]["weights_bytes"] == plain.capabilities()["memory"]["weights_bytes"]


def test_kv_cache_view_path_equals_gather_path_and_full_forward(tiny_engine):
    """Contiguous slots attend over cache views (no gather, no mask in lockstep); scattered slots
    take the gather path; both equal the cache-free forward."""
    model = tiny_engine.model
    a, b = torch.tensor(IDS[:9]), torch.tensor(IDS[2:11])
    full_a, full_b = tiny_engine.logits(a.tolist()), tiny_engine.logits(b.tolist())
    for slots in ([0, 1], [3, 1]):  # contiguous / scattered
        model.setup_caches(max_batch=4, max_seq_len=32)
        with torch.inference_mode():
            prefill(model, a[:5], slot=slots[0], mixture=None)
            prefill(model, b[:5], slot=slots[1], mixture=None)
            for t in range(5, 9):  # lockstep: both rows at position t
                out = decode_one_token(model, torch.tensor([a[t], b[t]]), torch.tensor([t, t]), torch.tensor(slots), None)
                assert (out[0] - full_a[t]).abs().max().item() < 1e-5
                assert (out[1] - full_b[t]).abs().max().item() < 1e-5


@pytest.mark.parametrize("mode", [None, "bfloat16", "int8", "int4"])
def test_every_mode_keeps_mixtures_and_batching_exact_to_its_tolerance(tiny_llama_dir, adapters, mode):
    engine = load_tiny(tiny_llama_dir, mode, adapters)
    tol = BATCH_TOL[mode]
    alone_a = engine.logits(IDS, adapters={"a": 1.0})
    assert (engine.logits(IDS, adapters={"a": 1.0, "b": 0.0}) - alone_a).abs().max().item() < tol
    mixtures = [{"a": 0.5, "b": 0.3, "c": 0.2}, {"b": 1.0}, None, {"c": 0.6, "a": 0.4}]
    tokens = torch.tensor([IDS[:8], IDS[1:9], IDS[2:10], IDS[3:11]])
    matrix = engine.mixture_matrix([Sequence([1], mixture=m) for m in mixtures])
    with torch.inference_mode():
        batched = engine.model(tokens, mixture=matrix)
    for i, m in enumerate(mixtures):
        assert (batched[i] - engine.logits(tokens[i].tolist(), adapters=m)).abs().max().item() < tol
    assert (batched[0] - batched[1]).abs().max().item() > max(5 * tol, 0.3)  # the mixtures do differ
    # continuous batching through the scheduler: each sequence's greedy tokens = generated alone
    batch = engine.new_batch(max_batch=4, max_seq_len=64)
    seqs = [engine.sequence("hello world", max_tokens=6, adapters=m, ignore_eos=True) for m in mixtures]
    for s in seqs:
        batch.add(s)
    while len(batch):
        batch.step()
    for s, m in zip(seqs, mixtures):
        list(engine.generate("hello world", max_tokens=6, adapters=m, ignore_eos=True))
        alone = engine.last_sequence
        assert s.output_ids == alone.output_ids


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int_modes_stay_within_their_kl_bound_on_the_default_model(engine, model_cache, mode):
    quant = Engine.load(cache_dir=model_cache, quant=mode)
    assert quant.capabilities()["precision"] == mode
    assert isinstance(quant.model.lm_head, Int8Linear if mode == "int8" else Int4Linear)
    assert quant.capabilities()["memory"]["weights_bytes"] < 0.6 * engine.capabilities()["memory"]["weights_bytes"]
    for text in QUALITY_TEXTS:
        ids = engine.tokenize(text)
        ref, got = engine.logits(ids), quant.logits(ids)
        assert mean_kl(got, ref) < KL_BOUND[mode]
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.75


def test_int8_mode_with_a_dora_adapter_tracks_float32_with_the_same_adapter(tiny_llama_dir, adapters):
    ref, q = load_tiny(tiny_llama_dir, None, adapters), load_tiny(tiny_llama_dir, "int8", adapters)
    mix = {"a": 0.5, "b": 0.3, "c": 0.2}
    base_gap = mean_kl(q.logits(IDS), ref.logits(IDS))
    with_adapter = mean_kl(q.logits(IDS, adapters=mix), ref.logits(IDS, adapters=mix))
    assert with_adapter < KL_BOUND["int8"]
    # the adapters add no error of their own: their paths and g scales are exact
    assert with_adapter < 3 * base_gap + 1e-4
    # and they do change the output
    assert mean_kl(q.logits(IDS, adapters=mix), q.logits(IDS)) > 10 * with_adapter


def test_quantised_linears_dequantise_to_the_weight_they_approximate():
    torch.manual_seed(0)
    w = torch.randn(96, 64)  # 96 rows: int4 pads to 16-row multiples, views whole 64-row blocks
    x = torch.randn(3, 64)
    for cls, tol in ((Int8Linear, 0.02), (Int4Linear, 0.2)):
        q = cls.from_weight(w)
        dense = q.dense_weight()
        assert ((dense - w).norm() / w.norm()).item() < tol
        assert ((q(x) - x @ dense.T).norm() / (x @ dense.T).norm()).item() < 0.01  # kernel = its own W0
        start, end = (64, 96) if cls is Int8Linear else (0, 64)
        assert torch.allclose(q.rows(start, end)(x), q(x)[:, start:end], atol=0.05, rtol=0.01)  # the parent's rows (bf16 output rounding)


def test_bad_quant_mode_and_quant_on_ternary_are_rejected(tiny_llama_dir):
    with pytest.raises(EngineError, match="quant 'int3'"):
        Engine.load(tiny_llama_dir, quant="int3")
    with pytest.raises(EngineError, match="ternary"):
        Engine.load(tiny_llama_dir, quant="int4", ternary=True)
    w2a8 = Engine.load(tiny_llama_dir, quant="int8", ternary=True)
    assert w2a8.model.model.layers[0].self_attn.q_proj.int8_kernel
    assert w2a8.capabilities()["precision"] == "ternary-int8"


@pytest.mark.parametrize("divide_scale", [False, True])
def test_packed_ternary_int8_kernel_equals_the_unpacked_float_path(divide_scale):
    torch.manual_seed(0)
    layer = BitLinear(256, 96, divide_scale=divide_scale)
    q = torch.randint(-1, 2, (96, 256))
    layer.weight.copy_(pack_ternary(q))
    layer.weight_scale.fill_(0.37)
    assert torch.equal(unpack_ternary_int8(layer.weight).long(), q)
    assert torch.equal(unpack_ternary_int8(layer.weight).float(), unpack_ternary(layer.weight))
    x = torch.randn(2, 5, 256)
    with torch.inference_mode():
        slow = layer(x)
        layer.int8_kernel = True
        fast = layer(x)
    assert ((fast - slow).abs().max() / slow.abs().max()).item() < 1e-5


def test_bitnet_2b4t_shaped_layer_keeps_at_most_2_1_bits_per_weight_resident():
    cfg = ModelConfig(vocab_size=256, dim=2560, n_layers=1, n_heads=20, n_kv_heads=5, hidden_dim=6912, arch="bitnet",
                      ternary=True, max_seq_len=16)
    model = Transformer(cfg)
    assert linear_weight_bits(model) <= 2.1
