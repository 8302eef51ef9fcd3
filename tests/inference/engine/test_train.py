import pytest
import torch
import torch.nn.functional as F

from inference.engine import Engine, TrainingError
from inference.engine.train import IGNORE, TrainConfig, encode_example, example_messages, train_dora

FACTS = [
    {"instruction": "What colour is the R3MES logo?", "response": "The R3MES logo is teal."},
    {"instruction": "Who votes on R3MES experts?", "response": "Stakers vote on R3MES experts."},
    {"messages": [{"role": "user", "content": "Name the R3MES backbone."},
                  {"role": "assistant", "content": "The backbone is BitNet."}]},
    {"instruction": "How are R3MES adapters trained?", "response": "Miners train DoRA adapters."},
]


def response_loss(engine, examples, adapters=None) -> float:
    """Mean next-token loss on response tokens, computed through the inference path."""
    total, count = 0.0, 0
    for i, ex in enumerate(examples):
        ids, labels = encode_example(engine.tokenizer, example_messages(ex, i), 512)
        logits = engine.logits(ids, adapters=adapters)
        target = torch.tensor(labels[1:])
        total += F.cross_entropy(logits[:-1], target, ignore_index=IGNORE, reduction="sum").item()
        count += int((target != IGNORE).sum())
    return total / count


def test_loss_is_computed_only_on_response_tokens(engine):
    ids, labels = encode_example(engine.tokenizer, example_messages(FACTS[2], 2), 512)
    trained_on = engine.detokenize([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert trained_on == "The backbone is BitNet.<|im_end|>\n"
    assert engine.detokenize(ids).startswith("<|im_start|>system")


def test_trainer_lowers_loss_on_small_dataset_of_default_model(engine, tmp_path):
    before = response_loss(engine, FACTS)
    steps = []
    try:
        config = TrainConfig(rank=8, alpha=16, lr=3e-3, steps=5, batch_size=2, seed=0,
                             target_modules=("q_proj", "v_proj", "o_proj"))
        result = train_dora(engine, FACTS, config,
                            adapter="facts", on_step=lambda step, loss: steps.append((step, loss)),
                            save_to=tmp_path / "facts")
        after = response_loss(engine, FACTS, adapters={"facts": 1.0})
        assert after < 0.5 * before
        assert result.losses[-1] < result.losses[0]
        assert [s for s, _ in steps] == list(range(1, 6)) and [l for _, l in steps] == result.losses
        assert (tmp_path / "facts" / "adapter_model.safetensors").is_file()
        assert response_loss(engine, FACTS) == pytest.approx(before, abs=1e-6)  # backbone untouched
    finally:
        engine.unload_adapter("facts")


def test_trainer_refuses_non_dora_trainable_parameters(tiny_engine):
    tiny_engine.model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(TrainingError, match=r"model\.embed_tokens\.weight"):
        train_dora(tiny_engine, FACTS, TrainConfig(steps=1), adapter="x")
    tiny_engine.model.model.embed_tokens.weight.requires_grad_(False)
    assert all(not p.requires_grad for p in tiny_engine.model.parameters())


def test_trainer_is_deterministic_for_a_seed(tiny_llama_dir):
    cfg = TrainConfig(rank=4, alpha=8, lr=5e-3, steps=3, batch_size=2, grad_accum=2, seed=11)
    runs = [train_dora(Engine.load(tiny_llama_dir), FACTS, cfg, adapter="d").losses for _ in range(2)]
    assert runs[0] == runs[1]
    other = train_dora(Engine.load(tiny_llama_dir), FACTS, TrainConfig(**{**cfg.__dict__, "seed": 12}), adapter="d")
    assert other.losses != runs[0]


def test_trainer_changes_only_dora_parameters_and_saves_a_peft_adapter(tiny_llama_dir, tiny_engine, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    backbone = {k: v.clone() for k, v in tiny_engine.model.state_dict().items()}
    train_dora(tiny_engine, FACTS, TrainConfig(rank=4, alpha=8, lr=1e-2, steps=3, batch_size=2,
                                               target_modules=("q_proj", "v_proj", "down_proj")),
               adapter="t", save_to=tmp_path / "t")
    for key, value in tiny_engine.model.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, backbone[key.replace(".base_layer", "")]), key
    ids = [20, 30, 40, 50, 60]
    ours = tiny_engine.logits(ids, adapters={"t": 1.0})
    assert (ours - tiny_engine.logits(ids)).abs().max() > 1e-4  # training moved the adapter
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "t").eval()
    with torch.no_grad():
        assert (peft_model(torch.tensor([ids])).logits[0] - ours).abs().max().item() < 1e-4
    fresh = Engine.load(tiny_llama_dir)
    fresh.load_adapter("t", tmp_path / "t")
    assert torch.allclose(fresh.logits(ids, adapters={"t": 1.0}), ours, atol=1e-5)


def test_trainer_updates_every_projection_when_it_targets_all_seven(tiny_engine):
    """With q, k and v (and gate, up) all adapted, the forward runs the fused backbone products;
    live training must still take each projection's own DoRA path, so every B (zero at start) moves."""
    from inference.engine.dora import DEFAULT_TARGETS, dora_modules

    train_dora(tiny_engine, FACTS, TrainConfig(rank=4, alpha=8, lr=1e-2, steps=2, batch_size=2,
                                               target_modules=DEFAULT_TARGETS), adapter="all")
    modules = dora_modules(tiny_engine.model)
    assert len(modules) == 7 * len(tiny_engine.model.model.layers)
    unmoved = [path for path, m in modules.items() if not m.lora_B["all"].abs().sum() > 0]
    assert unmoved == []


def test_trainer_records_eval_loss_and_continues_an_existing_adapter(tiny_engine, tmp_path):
    data = FACTS * 2
    evals = []
    first = train_dora(tiny_engine, data, TrainConfig(rank=4, steps=4, batch_size=2, eval_fraction=0.25, eval_every=2),
                       adapter="e", on_eval=lambda step, loss: evals.append(step), save_to=tmp_path / "e")
    assert first.n_eval == 2 and first.n_train == 6
    assert [s for s, _ in first.eval_losses] == [2, 4] == evals
    fresh = Engine.load(tiny_engine.source)
    second = train_dora(fresh, data, TrainConfig(rank=4, steps=2, batch_size=2), adapter="e", init_from=tmp_path / "e")
    # resuming starts from the trained adapter, so its first loss beats a fresh adapter's first loss
    assert second.losses[0] < first.losses[0]


def test_trainer_rejects_bad_examples_and_config(tiny_engine):
    with pytest.raises(TrainingError, match="example 0"):
        train_dora(tiny_engine, [{"prompt": "x"}], TrainConfig(steps=1))
    with pytest.raises(TrainingError, match="no training examples"):
        train_dora(tiny_engine, [], TrainConfig(steps=1))
    with pytest.raises(TrainingError, match="lr"):
        TrainConfig(lr=0)
    assert tiny_engine.adapters == []
