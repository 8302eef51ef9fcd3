import torch

from inference.engine import Engine
from inference.engine.generate import decode_one_token, prefill

PROMPT = "The history of the Roman Empire spans many centuries, beginning with"


def test_float32_logits_match_transformers_llama_from_same_gguf(engine, default_gguf):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32)
    ids = engine.tokenize(PROMPT)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = engine.logits(ids)
    assert got.shape == (len(ids), engine.config.vocab_size) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-3


def test_float32_logits_match_transformers_llama_from_hf_dir(tiny_llama_dir, tiny_engine):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = list(range(5, 40))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (tiny_engine.logits(ids) - expected).abs().max().item() < 1e-4


def test_kv_cache_prefill_then_decode_matches_full_forward(tiny_engine):
    model = tiny_engine.model
    ids = torch.tensor([3, 17, 99, 4, 250, 31, 8, 77, 64, 12])
    full = tiny_engine.logits(ids.tolist())
    model.setup_caches(max_batch=2, max_seq_len=64)
    with torch.inference_mode():
        last = prefill(model, ids[:6], slot=1, mixture=None)
        assert torch.allclose(last, full[5], atol=1e-5)
        for t in range(6, 10):
            step = decode_one_token(model, ids[t : t + 1], torch.tensor([t]), torch.tensor([1]), None)[0]
            assert torch.allclose(step, full[t], atol=1e-5)


def test_batched_decode_at_different_positions_matches_each_sequence_alone(tiny_engine):
    model = tiny_engine.model
    a = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    b = torch.tensor([200, 100, 50])
    full_a, full_b = tiny_engine.logits(a.tolist()), tiny_engine.logits(b.tolist())
    model.setup_caches(max_batch=4, max_seq_len=64)
    with torch.inference_mode():
        prefill(model, a[:5], slot=2, mixture=None)
        prefill(model, b[:1], slot=0, mixture=None)
        # one forward, two sequences, positions 5 and 1
        out = decode_one_token(model, torch.tensor([a[5], b[1]]), torch.tensor([5, 1]), torch.tensor([2, 0]), None)
    assert torch.allclose(out[0], full_a[5], atol=1e-5)
    assert torch.allclose(out[1], full_b[1], atol=1e-5)


def test_bfloat16_engine_agrees_with_float32_reference(tiny_llama_dir, tiny_engine):
    bf16 = Engine.load(tiny_llama_dir, dtype="bfloat16")
    assert bf16.capabilities()["dtype"] == "bfloat16"
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    ids = list(range(20, 60))
    ref, got = tiny_engine.logits(ids), bf16.logits(ids)
    assert got.dtype == torch.float32
    # bf16 keeps ~3 significant digits: the relative error stays small and the ranking agrees
    assert ((got - ref).norm() / ref.norm()).item() < 0.03
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_default_model_generates_bfloat16_text(model_cache):
    bf16 = Engine.load(cache_dir=model_cache, dtype="bfloat16")
    text = "".join(bf16.generate([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12))
    assert "Paris" in text
