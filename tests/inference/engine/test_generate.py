import threading

import pytest
import torch

from inference.engine import ContextLengthExceeded, EngineError
from inference.engine.generate import REPEAT_WINDOW, SamplingParams, TextStream, apply_penalties

from .test_dora import make_peft_adapter

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_greedy_generation_matches_argmax_of_full_forward(engine):
    text = "".join(engine.generate(CHAT, max_tokens=8))
    seq = engine.last_sequence
    assert text == seq.text and len(seq.output_ids) > 3
    full = engine.logits(seq.prompt_ids + seq.output_ids)
    n = len(seq.prompt_ids)
    assert full[n - 1 : -1].argmax(-1).tolist() == seq.output_ids


def test_chat_answer_is_sensible_and_stops_at_end_of_turn(engine):
    text = "".join(engine.generate([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12))
    assert "Paris" in text and "<|im_end|>" not in text
    assert engine.last_sequence.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_engine):
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50)
    a = "".join(tiny_engine.generate("Once upon a time", seed=7, **kw))
    b = "".join(tiny_engine.generate("Once upon a time", seed=7, **kw))
    c = "".join(tiny_engine.generate("Once upon a time", seed=8, **kw))
    assert a == b and a != c


def test_top_k_one_and_tiny_top_p_reduce_to_greedy(tiny_engine):
    list(tiny_engine.generate("The sun is", max_tokens=10))
    greedy = tiny_engine.last_sequence.output_ids
    list(tiny_engine.generate("The sun is", max_tokens=10, temperature=1.3, top_k=1, seed=1))
    assert tiny_engine.last_sequence.output_ids == greedy
    list(tiny_engine.generate("The sun is", max_tokens=10, temperature=1.3, top_p=1e-6, seed=2))
    assert tiny_engine.last_sequence.output_ids == greedy


def test_max_tokens_limits_the_output(tiny_engine):
    list(tiny_engine.generate("Count: one, two, three,", max_tokens=5))
    assert len(tiny_engine.last_sequence.output_ids) == 5 and tiny_engine.last_sequence.finish_reason == "length"


def test_stop_string_ends_generation_and_is_never_streamed(engine):
    full = "".join(engine.generate("Once upon a time", max_tokens=12))
    stop = full.split()[2]  # a word greedy decoding is known to produce
    pieces = list(engine.generate("Once upon a time", max_tokens=12, stop=[stop]))
    text = "".join(pieces)
    assert text == full[: full.find(stop)]
    assert engine.last_sequence.finish_reason == "stop"


def test_stop_string_split_across_tokens_is_held_back_then_cut(engine):
    stream = TextStream(engine.tokenizer, stop=("END!",))
    ids = engine.tokenize("alpha beta EN") + engine.tokenize("D! gamma")
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    assert "".join(pieces) == "alpha beta " and stream.stopped
    assert all("EN" not in p for p in pieces)


def test_streamed_pieces_are_whole_utf8_characters(engine):
    target = "Zürich 日本語 🤖 ok"
    stream = TextStream(engine.tokenizer, stop=())
    pieces = [stream.push(t) for t in engine.tokenize(target)]
    assert "".join(pieces) + stream.flush() == target
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # the emoji spans several byte-level tokens and was held back


def test_cancel_event_stops_generation_between_steps(tiny_engine):
    cancel = threading.Event()
    seq = tiny_engine.sequence("Tell me a long story.", max_tokens=100, cancel=cancel)
    batch = tiny_engine.new_batch(max_batch=1, max_seq_len=128)
    batch.add(seq)
    while len(batch):
        batch.step()
        if len(seq.output_ids) == 3:
            cancel.set()  # e.g. the Stop button, seen by the worker before its next step
    assert seq.finish_reason == "cancelled" and len(seq.output_ids) == 3


def test_cancel_callable_is_polled_between_steps(tiny_engine):
    polls = []
    list(tiny_engine.generate("hi", max_tokens=50, cancel=lambda: polls.append(1) or len(polls) > 4))
    assert tiny_engine.last_sequence.finish_reason == "cancelled"
    assert len(tiny_engine.last_sequence.output_ids) == 4


def test_callback_receives_every_streamed_piece(engine):
    seen = []
    pieces = list(engine.generate("Hello", max_tokens=4, callback=seen.append))
    assert seen == pieces and "".join(pieces) == engine.last_sequence.text != ""


def test_prompt_longer_than_context_raises_context_length_exceeded(engine):
    with pytest.raises(ContextLengthExceeded, match="max_seq_len"):
        engine.logits([1] * (engine.config.max_seq_len + 1))
    with pytest.raises(ContextLengthExceeded):
        next(engine.generate("word " * 300, max_seq_len=256))
    with pytest.raises(EngineError, match="empty"):
        engine.logits([])


def test_invalid_sampling_parameters_raise_engine_error():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0), dict(frequency_penalty=2.5),
                dict(presence_penalty=-3), dict(repetition_penalty=0), dict(repetition_penalty=2.5)):
        with pytest.raises(EngineError):
            SamplingParams(**bad)


def run_alone(engine, seq_args):
    list(engine.generate(**seq_args))
    return engine.last_sequence.output_ids


def test_continuous_batch_sequences_join_and_leave_and_match_running_alone(tiny_llama_dir, tiny_engine, tmp_path):
    make_peft_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    make_peft_adapter(tiny_llama_dir, tmp_path / "b", seed=2, targets=("o_proj", "gate_proj"))
    tiny_engine.load_adapter("a", tmp_path / "a")
    tiny_engine.load_adapter("b", tmp_path / "b")
    requests = [
        dict(messages_or_prompt="hello there", max_tokens=6, adapters={"a": 0.6, "b": 0.4}),
        dict(messages_or_prompt="x", max_tokens=3, adapters={"b": 1.0}),
        dict(messages_or_prompt="a longer prompt with more tokens", max_tokens=5),
        dict(messages_or_prompt="sampled", max_tokens=7, temperature=0.8, seed=3, adapters={"a": 1.0}),
    ]
    expected = [run_alone(tiny_engine, r) for r in requests]

    batch = tiny_engine.new_batch(max_batch=2, max_seq_len=128)
    seqs = [tiny_engine.sequence(**r) for r in requests]
    streamed = {s.id: "" for s in seqs}
    batch.add(seqs[0])
    batch.add(seqs[1])
    for out in batch.step():
        streamed[out.seq.id] += out.piece
    batch.add(seqs[2])  # waits for a free slot
    batch.add(seqs[3])
    sizes = []
    while len(batch):
        sizes.append(len(batch.running))
        for out in batch.step():
            streamed[out.seq.id] += out.piece
    assert max(sizes) == 2 and all(s.finished for s in seqs)
    assert [s.output_ids for s in seqs] == expected
    for s in seqs:
        assert streamed[s.id] == tiny_engine.tokenizer.decode(s.output_ids, skip_special_tokens=True)


def test_batch_cancel_frees_the_slot_for_waiting_sequences(tiny_engine):
    batch = tiny_engine.new_batch(max_batch=1, max_seq_len=64)
    stop = threading.Event()
    first = batch.add(tiny_engine.sequence("one", max_tokens=50, cancel=stop))
    second = batch.add(tiny_engine.sequence("two", max_tokens=2))
    batch.step()
    assert batch.running == [first] and batch.waiting == [second]
    stop.set()
    outs = batch.step()
    assert first.finish_reason == "cancelled" and any(o.seq is second for o in outs)
    while len(batch):
        batch.step()
    assert second.finish_reason == "length" and len(second.output_ids) == 2


def test_penalties_follow_openai_and_llama_cpp_formulas():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    same = apply_penalties(logits, SamplingParams(), [0, 1], [3, 3])
    assert same is logits  # no penalty: untouched, no copy
    # OpenAI: minus frequency x count minus presence once, over the generated tokens only
    got = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [0, 1], [3, 3, 2])
    assert torch.allclose(got, torch.tensor([2.0, -1.0, 0.5 - 0.75, 3.0 - 1.25, 1.0]))
    # Repetition: positive logits divided, negative multiplied, for the last REPEAT_WINDOW tokens
    got = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), [1, 4], [0, 0])
    assert torch.allclose(got, torch.tensor([1.0, -2.0, 0.5, 3.0, 0.5]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0]))  # the caller's logits are left alone
    far = [4] + [0] * REPEAT_WINDOW  # token 4 is outside the window
    got = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), far[:10], far[10:])
    assert got[4] == 1.0 and got[0] == 1.0


def test_penalties_break_a_greedy_loop(engine):
    """The default model at temperature 0 loops on this prompt ("Abe a sea of dreams, / The
    ocean's a place of endless wonder," over and over); either penalty breaks the loop (the share
    of distinct 4-grams among 64 tokens)."""
    prompt = [{"role": "user", "content": "Write a poem about the sea."}]

    def distinct_4grams(**kw):
        list(engine.generate(prompt, max_tokens=64, ignore_eos=True, **kw))
        ids = engine.last_sequence.output_ids
        return len({tuple(ids[i:i + 4]) for i in range(len(ids) - 3)}) / (len(ids) - 3)

    plain = distinct_4grams()
    assert plain < 0.6  # the loop this test is about (0.52 measured)
    assert distinct_4grams(repetition_penalty=1.1) > 0.9  # 1.0 measured
    assert distinct_4grams(frequency_penalty=0.5) > plain + 0.1  # 0.70 measured


def test_adapter_loads_beside_a_compile_take_the_gil_back_quickly_and_steps_keep_the_default(
        tiny_llama_dir, tiny_engine, tmp_path, monkeypatch):
    """While the model compiles (Engine.compile_decode sets model.compiling; here set by hand), an
    adapter load runs with a 100 us GIL switch interval, a step with Python's default, and the
    process's interval is back afterwards, also when two threads overlap. validate_spec is wrapped
    only to read the interval while the load runs."""
    import sys

    from inference.engine import dora, generate

    default = sys.getswitchinterval()
    seen = []
    real_validate = dora.validate_spec

    def validate_spec(*args):
        seen.append(("load", sys.getswitchinterval()))
        return real_validate(*args)

    monkeypatch.setattr(dora, "validate_spec", validate_spec)
    tiny_engine.model.lm_head.register_forward_pre_hook(lambda *_: seen.append(("step", sys.getswitchinterval())))
    make_peft_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    batch = tiny_engine.new_batch(max_batch=2, max_seq_len=64)
    batch.add(tiny_engine.sequence("hello there", max_tokens=3))
    batch.step()
    tiny_engine.load_adapter("a", tmp_path / "a")
    assert seen == [("step", default), ("load", default)]  # not compiling: untouched
    seen.clear()
    tiny_engine.model.compiling = True
    try:
        batch.step()
        tiny_engine.load_adapter("a", tmp_path / "a")
        short = pytest.approx(generate.COMPILING_SWITCH_INTERVAL)  # Python keeps it in whole microseconds
        assert seen == [("step", default), ("load", short)]
        assert sys.getswitchinterval() == default
        # Overlapping holders: the interval stays short until the last one leaves.
        entered, leave = threading.Event(), threading.Event()

        def hold():
            with generate.quick_gil_while_compiling(tiny_engine.model):
                entered.set()
                leave.wait(30)

        other = threading.Thread(target=hold)
        other.start()
        assert entered.wait(30)
        with generate.quick_gil_while_compiling(tiny_engine.model):
            pass
        assert sys.getswitchinterval() == short  # the other thread still holds it
        leave.set()
        other.join(30)
        assert sys.getswitchinterval() == default
    finally:
        tiny_engine.model.compiling = False
        sys.setswitchinterval(default)
