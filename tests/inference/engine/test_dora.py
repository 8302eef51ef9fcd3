import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.engine import AdapterError, MixtureError, UnknownAdapter
from inference.engine.dora import DoraLinear, dora_modules

from .conftest import make_tiny_llama

IDS = [12, 200, 7, 45, 99, 3, 150, 61, 8, 240, 33]


def make_peft_adapter(base_dir, out, seed=1, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), rslora=False):
    """A DoRA adapter made by PEFT itself, with B perturbed away from zero (and m away from ||W0||)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, use_dora=True, use_rslora=rslora,
                                                 target_modules=list(targets), lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return peft_model.eval()


def peft_logits(peft_model, ids=IDS):
    with torch.no_grad():
        return peft_model(torch.tensor([ids])).logits[0]


@pytest.fixture
def two_adapters(tiny_llama_dir, tmp_path):
    a = make_peft_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    b = make_peft_adapter(tiny_llama_dir, tmp_path / "b", seed=2, r=2, targets=("k_proj", "o_proj", "up_proj", "v_proj"))
    return tmp_path / "a", tmp_path / "b", peft_logits(a), peft_logits(b)


def test_adapter_on_every_projection_gives_peft_logits_through_the_grouped_path(tiny_llama_dir, tiny_engine, tmp_path):
    from inference.engine.dora import DEFAULT_TARGETS

    peft_model = make_peft_adapter(tiny_llama_dir, tmp_path / "all", targets=DEFAULT_TARGETS)
    tiny_engine.load_adapter("all", tmp_path / "all")
    got = tiny_engine.logits(IDS, adapters={"all": 1.0})
    assert all(l.self_attn.mix_plan is not None and l.mlp.mix_plan is not None
               for l in tiny_engine.model.model.layers)
    assert (got - peft_logits(peft_model)).abs().max().item() < 1e-4


def test_adapters_on_biased_projections_give_peft_logits(tmp_path):
    """Checkpoints with attention biases (Qwen-style) take the per-projection path inside the fused
    q|k|v group (DoRA's norm and g apply to the bias-free product); single and mixed batches."""
    from inference.engine import Engine
    from inference.engine.dora import DEFAULT_TARGETS
    from inference.engine.generate import Sequence

    base = make_tiny_llama(tmp_path / "biased", attention_bias=True)
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(base)
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
        hf.save_pretrained(base)
    peft_model = make_peft_adapter(base, tmp_path / "ad", targets=DEFAULT_TARGETS)
    eng = Engine.load(base)
    eng.load_adapter("ad", tmp_path / "ad")
    assert eng.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    # the wrapper does not register the backbone's bias a second time
    assert not any(k.endswith("q_proj.bias") for k in eng.model.state_dict())
    got = eng.logits(IDS, adapters={"ad": 1.0})
    assert (got - peft_logits(peft_model)).abs().max().item() < 1e-4
    matrix = eng.mixture_matrix([Sequence([1], mixture=m) for m in ({"ad": 1.0}, None)])
    with torch.no_grad():
        batched = eng.model(torch.tensor([IDS, IDS]), mixture=matrix)
    assert (batched[0] - got).abs().max().item() < 1e-4
    assert (batched[1] - eng.logits(IDS)).abs().max().item() < 1e-4
    assert (batched[0] - batched[1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_dora_adapter_gives_peft_logits(tiny_llama_dir, tiny_engine, tmp_path, rslora):
    peft_model = make_peft_adapter(tiny_llama_dir, tmp_path / "ad", rslora=rslora)
    tiny_engine.load_adapter("coding", tmp_path / "ad")
    expected = peft_logits(peft_model)
    assert (tiny_engine.logits(IDS, adapters={"coding": 1.0}) - expected).abs().max().item() < 1e-4
    # the adapter really changes the output, so the comparison above is not trivially true
    assert (tiny_engine.logits(IDS) - expected).abs().max().item() > 1e-2


def test_peft_dora_adapter_on_default_model_gives_peft_logits(engine, model_cache, tmp_path):
    from inference.engine.loaders import prepare_default_model

    peft_model = make_peft_adapter(prepare_default_model(model_cache), tmp_path / "ad", r=8, alpha=16,
                                   targets=("q_proj", "v_proj", "gate_proj"))
    ids = engine.tokenize("Adapters specialise the backbone for one domain.")
    engine.load_adapter("real", tmp_path / "ad")
    try:
        assert (engine.logits(ids, adapters={"real": 1.0}) - peft_logits(peft_model, ids)).abs().max().item() < 1e-3
    finally:
        engine.unload_adapter("real")


def test_adapter_saved_by_us_loads_in_peft_with_same_logits(tiny_llama_dir, tiny_engine, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tiny_engine.new_adapter("ours", r=4, alpha=8, target_modules=("q_proj", "up_proj", "o_proj"))
    with torch.no_grad():  # give it non-trivial B and m
        for layer in dora_modules(tiny_engine.model).values():
            layer.lora_B["ours"].normal_(0, 0.2)
            layer.lora_magnitude_vector["ours"].mul_(1.1)
            layer.rebuild()
    tiny_engine.save_adapter("ours", tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA" and config["r"] == 4
    keys = load_file(tmp_path / "saved" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight" in keys
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "saved").eval()
    ours = tiny_engine.logits(IDS, adapters={"ours": 1.0})
    assert (ours - peft_logits(peft_model)).abs().max().item() < 1e-4
    assert (ours - tiny_engine.logits(IDS)).abs().max().item() > 1e-2


def test_mixture_of_one_adapter_equals_that_adapter_alone(tiny_engine, two_adapters):
    a_dir, b_dir, a_ref, _ = two_adapters
    tiny_engine.load_adapter("a", a_dir)
    alone = tiny_engine.logits(IDS, adapters={"a": 1.0})
    tiny_engine.load_adapter("b", b_dir)
    for mixture in ({"a": 1.0}, {"a": 1.0, "b": 0.0}, {"a": 3.0}):
        assert (tiny_engine.logits(IDS, adapters=mixture) - alone).abs().max().item() < 1e-5
    assert (alone - a_ref).abs().max().item() < 1e-4


def test_mixture_applies_the_weighted_dora_formula_per_layer(tiny_engine, two_adapters):
    a_dir, b_dir, _, _ = two_adapters
    tiny_engine.load_adapter("a", a_dir)
    tiny_engine.load_adapter("b", b_dir)
    layer = tiny_engine.model.model.layers[0].self_attn.v_proj  # targeted by both
    assert isinstance(layer, DoraLinear)
    x = torch.randn(2, 3, layer.in_features)
    w = {"a": 0.7, "b": 0.3}
    W0 = layer.base_layer.weight
    expected_terms = []
    for name, wi in w.items():
        A, B, m, s = (layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude_vector[name], layer.scaling[name])
        g = m / torch.linalg.norm(W0 + s * B @ A, dim=1)
        expected_terms.append(wi * g * (x @ W0.T) + wi * g * s * (x @ A.T @ B.T))
    ctx = tiny_engine.model.adapter_context
    ctx.set_mixture(torch.tensor([[0.7, 0.3], [0.7, 0.3]]))
    try:
        got = layer(x)
    finally:
        ctx.set_mixture(None)
    assert torch.allclose(got, sum(expected_terms), atol=1e-5)


def test_batched_mixed_batch_equals_each_sequence_alone(tiny_engine, two_adapters):
    a_dir, b_dir, _, _ = two_adapters
    tiny_engine.load_adapter("a", a_dir)
    tiny_engine.load_adapter("b", b_dir)
    mixtures = [{"a": 0.7, "b": 0.3}, {"b": 1.0}, None, {"a": 0.2, "b": 0.8}]
    tokens = torch.tensor([IDS[:8], IDS[1:9], IDS[2:10], IDS[3:11]])
    from inference.engine.generate import Sequence

    matrix = tiny_engine.mixture_matrix([Sequence([1], mixture=m) for m in mixtures])
    with torch.no_grad():
        batched = tiny_engine.model(tokens, mixture=matrix)
    for i, m in enumerate(mixtures):
        alone = tiny_engine.logits(tokens[i].tolist(), adapters=m)
        assert (batched[i] - alone).abs().max().item() < 1e-5
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # the mixtures differ, so should the outputs


def test_mixed_batch_runs_one_backbone_matmul_per_layer(tiny_engine, two_adapters):
    """Adapters never add backbone products: with fused q|k|v and gate|up, each layer runs its four
    backbone matmuls once for the whole batch, and the per-projection base layers stay unused."""
    a_dir, b_dir, _, _ = two_adapters
    tiny_engine.load_adapter("a", a_dir)
    tiny_engine.load_adapter("b", b_dir)
    calls = []
    backbone = []
    for layer in tiny_engine.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.qkv_proj is not None and mlp.gate_up_proj is not None  # Engine.load fuses by default
        backbone += [attn.qkv_proj, mlp.gate_up_proj, attn.o_proj.base_layer, mlp.down_proj.base_layer]
        backbone += [getattr(p, "base_layer", p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)]
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0].shape[0]))) for m in backbone]
    from inference.engine.generate import Sequence

    matrix = tiny_engine.mixture_matrix([Sequence([1], mixture=m) for m in ({"a": 1}, {"b": 1}, {"a": 1, "b": 1})])
    with torch.no_grad():
        mixed = tiny_engine.model(torch.tensor([IDS[:4]] * 3), mixture=matrix)
    for h in hooks:
        h.remove()
    assert len(calls) == 4 * len(tiny_engine.model.model.layers) and {n for _, n in calls} == {3}
    assert {id(m) for m, _ in calls} == {id(m) for i, m in enumerate(backbone) if i % 9 < 4}
    # each fused group took one mixture plan: q|k|v (all adapted) and gate|up, where only up_proj
    # carries an adapter (gate's columns keep g = 1 and get no low-rank path)
    for l in tiny_engine.model.model.layers:
        assert l.self_attn.mix_plan is not None and len(l.self_attn.mix_plan[1][1]) == 3
        assert l.mlp.mix_plan is not None and [p[:2] for p in l.mlp.mix_plan[1][1]] == [(l.mlp.gate_proj.out_features, 2 * l.mlp.gate_proj.out_features)]
    # and the fused path gives what each projection computed on its own would
    for layer in tiny_engine.model.model.layers:
        layer.self_attn.qkv_proj, layer.mlp.gate_up_proj = None, None
    with torch.no_grad():
        separate = tiny_engine.model(torch.tensor([IDS[:4]] * 3), mixture=matrix)
    assert (mixed - separate).abs().max().item() < 1e-4


def test_unload_adapter_restores_base_logits(tiny_engine, two_adapters):
    base = tiny_engine.logits(IDS)
    tiny_engine.load_adapter("a", two_adapters[0])
    tiny_engine.unload_adapter("a")
    assert tiny_engine.adapters == []
    assert torch.equal(tiny_engine.logits(IDS), base)
    with pytest.raises(UnknownAdapter, match="'a'"):
        tiny_engine.unload_adapter("a")


def test_loading_an_adapter_keeps_the_other_adapters_magnitude_scales_until_their_factors_change(
        tiny_engine, two_adapters):
    """g = m / ||W0 + s B A|| needs the dense backbone weight (a dequantisation for int4): each load
    computes it for the new adapter only; an in-place change of an adapter's factors (what training
    does) computes it again."""
    from inference.engine.dora import dora_modules

    tiny_engine.load_adapter("a", two_adapters[0])
    try:
        module = dora_modules(tiny_engine.model)["model.layers.0.self_attn.q_proj"]
        g = module.magnitude_scale("a")
        tiny_engine.load_adapter("b", two_adapters[1])
        assert module.magnitude_scale("a") is g  # not recomputed by b's load
        with torch.no_grad():
            module.lora_B["a"].mul_(3)
        fresh = module.magnitude_scale("a")
        assert fresh is not g
        assert torch.allclose(fresh, module.lora_magnitude_vector["a"] / module.weight_norm("a"))
        assert not torch.allclose(fresh, g)
    finally:
        for name in list(tiny_engine.adapters):
            tiny_engine.unload_adapter(name)


def test_bad_mixtures_raise_typed_errors(tiny_engine, two_adapters):
    tiny_engine.load_adapter("a", two_adapters[0])
    with pytest.raises(UnknownAdapter, match="'nope'"):
        tiny_engine.logits(IDS, adapters={"nope": 1.0})
    with pytest.raises(MixtureError, match="'a'.*-0.5"):
        tiny_engine.logits(IDS, adapters={"a": -0.5})
    with pytest.raises(MixtureError, match="positive"):
        tiny_engine.logits(IDS, adapters={"a": 0.0})
    with pytest.raises(UnknownAdapter, match="'nope'"):
        next(tiny_engine.generate("hi", adapters={"nope": 1.0}))


def test_adapter_for_a_different_backbone_is_rejected_and_previous_adapters_stay(tiny_engine, two_adapters, tmp_path):
    tiny_engine.load_adapter("a", two_adapters[0])
    before = tiny_engine.logits(IDS, adapters={"a": 1.0})
    wider = make_tiny_llama(tmp_path / "wider", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    make_peft_adapter(wider, tmp_path / "wide_ad")
    with pytest.raises(AdapterError, match=r"has (in|out)_features 96, backbone has 64"):
        tiny_engine.load_adapter("a", tmp_path / "wide_ad")  # same name: must not clobber "a"
    with pytest.raises(AdapterError):
        tiny_engine.load_adapter("other", tmp_path / "wide_ad")
    assert tiny_engine.adapters == ["a"]
    assert torch.equal(tiny_engine.logits(IDS, adapters={"a": 1.0}), before)


def test_adapter_targeting_missing_module_or_malformed_files_is_rejected(tiny_engine, two_adapters, tmp_path):
    a_dir = two_adapters[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a_dir / "adapter_config.json").read_text())
    state = load_file(a_dir / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    save_file(renamed, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"model\.layers\.7\..*does not exist"):
        tiny_engine.load_adapter("bad", bad)

    save_file({k: v for k, v in state.items() if "magnitude" not in k}, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lora_magnitude_vector"):
        tiny_engine.load_adapter("bad", bad)

    data = (a_dir / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        tiny_engine.load_adapter("bad", bad)

    with pytest.raises(AdapterError, match="adapter_config.json"):
        tiny_engine.load_adapter("bad", tmp_path / "missing")
    assert tiny_engine.adapters == []
