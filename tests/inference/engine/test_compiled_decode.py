"""The compiled decode step (Engine.compile_decode: torch.compile + Inductor, real C++ kernels built
here) against the eager forward on tiny random checkpoints."""

import contextlib

import pytest
import torch

from inference.engine import Engine
from inference.engine.generate import SamplingParams, Sequence

from .test_dora import IDS, make_peft_adapter

PROMPTS = [IDS[:5], IDS[2:9], IDS[4:7]]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CountCalls:
    """Counts how often the compiled graph really runs (the batch picks it or the eager forward)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@contextlib.contextmanager
def two_adapters(engine, path, tmp_path):
    """Adapters "a" (r=3) and "b" (r=5) on different targets, loaded for the block."""
    make_peft_adapter(path, tmp_path / "a", seed=3, r=3, targets=("q_proj", "o_proj", "up_proj", "down_proj"))
    make_peft_adapter(path, tmp_path / "b", seed=4, r=5, targets=("k_proj", "v_proj", "gate_proj"))
    engine.load_adapter("a", tmp_path / "a")
    engine.load_adapter("b", tmp_path / "b")
    try:
        yield
    finally:
        engine.unload_adapter("a")
        engine.unload_adapter("b")


def graph_lowrank(model, mixture):
    """The mixture as the compiled graph takes it (what generate.decode_one_token passes)."""
    from inference.engine.dora import decode_lowrank

    model.adapter_context.set_mixture(mixture)
    try:
        return decode_lowrank(model, model.compiled_mixture_rank, model.compiled_mixture_dtype)
    finally:
        model.adapter_context.set_mixture(None)


def decode(engine, prompts, max_tokens, mixtures=None, compiled=None, rows=None):
    """Greedy tokens per prompt through one batch; max_tokens differ so that later sequences end up
    decoding alone in slots 1 and 2, not only slot 0. `compiled`: the lone-sequence graph, `rows`:
    the batch graph (None: eager; the engine's own batch graph is put back after)."""
    engine.model.compiled_decode = compiled
    own_rows, engine.model.compiled_rows = engine.model.compiled_rows, rows
    try:
        batch = engine.new_batch(max_batch=3, max_seq_len=64)
        seqs = [Sequence(list(ids), SamplingParams(max_tokens=n, ignore_eos=True),
                         mixture=(mixtures or [None] * 3)[i]) for i, (ids, n) in enumerate(zip(prompts, max_tokens))]
        for seq in seqs:
            batch.add(seq)
        while len(batch):
            batch.step()
    finally:
        engine.model.compiled_rows = own_rows
    return [s.output_ids for s in seqs]


@pytest.fixture(scope="module")
def compiled_engines(tmp_path_factory):
    """One float32 and one int4 tiny engine, each compiled once for the whole module."""
    from .conftest import make_tiny_llama

    path = make_tiny_llama(tmp_path_factory.mktemp("compiled"))
    out = {}
    for quant in (None, "int4"):
        engine = Engine.load(path, quant=quant)
        engine.new_batch(max_batch=3, max_seq_len=64)
        assert engine.compile_decode()
        out[quant] = (engine, engine.model.compiled_decode)
    return path, out


@pytest.mark.parametrize("quant", [None, "int4"])
def test_compiled_decode_gives_the_eager_tokens_in_every_slot_without_recompiling(compiled_engines, quant):
    _, engines = compiled_engines
    engine, graph = engines[quant]
    before = graphs()
    # The longest sequence ends up decoding alone: in slot 2, then 0, then 1 (5-6 lone steps each).
    for lengths in ((3, 8, 14), (9, 4, 2), (2, 9, 4)):
        spy = CountCalls(graph)
        got = decode(engine, PROMPTS, lengths, compiled=spy)
        longest, second = sorted(lengths)[-1], sorted(lengths)[-2]
        assert spy.calls == longest - second  # every lone step, and only those, took the graph
        assert got == decode(engine, PROMPTS, lengths, compiled=None)
    assert graphs() == before  # one dynamic graph: other slots and lengths do not recompile
    engine.model.compiled_decode = graph


def test_a_sequence_filling_the_context_keeps_to_the_graph_it_has(compiled_engines):
    _, engines = compiled_engines
    engine, graph = engines[None]
    before = graphs()
    runs = []
    for compiled in (CountCalls(graph), None):
        engine.model.compiled_decode = compiled
        batch = engine.new_batch(max_batch=3, max_seq_len=64)  # the cache the graph was built for
        seq = batch.add(Sequence(IDS[:5], SamplingParams(max_tokens=500, ignore_eos=True)))
        while len(batch):
            batch.step()
        runs.append(seq)
    assert runs[0].finish_reason == "length" and len(runs[0].prompt_ids) + len(runs[0].output_ids) == 64
    assert runs[0].output_ids == runs[1].output_ids
    assert graphs() == before
    engine.model.compiled_decode = graph


def test_compiled_logits_match_the_eager_forward_with_and_without_mixtures(compiled_engines, tmp_path):
    """The graph called directly (no eager fallback can hide a recompile) with mixtures of
    adapters of different ranks and targets, in slots 0 and 2."""
    path, engines = compiled_engines
    engine, graph = engines[None]
    model = engine.model
    ids = IDS[:9]
    with two_adapters(engine, path, tmp_path):
        before = graphs()
        outputs = []
        for mixture in (None, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.25, 0.75]])):
            with torch.inference_mode():
                full = model(torch.tensor([ids]), mixture=mixture)[0]  # eager, no cache
                lowrank = None if mixture is None else graph_lowrank(model, mixture)
                for slot in (0, 2):
                    model(torch.tensor([ids[:5]]), input_pos=torch.arange(5)[None], slots=torch.tensor([slot]),
                          mixture=mixture)
                    for pos in range(5, 9):
                        step = graph(torch.tensor([[ids[pos]]]), slot + 2, pos + 1 + 2, lowrank)[0, -1]
                        assert (step - full[pos]).abs().max().item() < 1e-4
            outputs.append(full)
        assert graphs() == before
        assert (outputs[0] - outputs[1]).abs().max() > 1e-2 and (outputs[1] - outputs[2]).abs().max() > 1e-2


def test_int4_mixtures_enter_the_graph_as_bfloat16_factors_within_a_rounding_of_the_eager_logits(
        compiled_engines, tmp_path):
    """In the quantised modes the graph's low-rank factors are bfloat16 (accumulated in float32, g
    in float32): the logits stay within bfloat16 rounding of those of the eager float32 factors, a
    small fraction of the adapters' own effect, with the same greedy token."""
    path, engines = compiled_engines
    engine, graph = engines["int4"]
    model = engine.model
    assert model.compiled_mixture_dtype == torch.bfloat16
    ids = IDS[:9]
    with two_adapters(engine, path, tmp_path), torch.inference_mode():
        before = graphs()
        plain = model(torch.tensor([ids]))[0]
        for mixture in (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.25, 0.75]])):
            full = model(torch.tensor([ids]), mixture=mixture)[0]  # eager: float32 factors
            lowrank = graph_lowrank(model, mixture)
            assert lowrank[0].dtype == torch.bfloat16 and lowrank[1].dtype == torch.float32  # F, G
            model(torch.tensor([ids[:5]]), input_pos=torch.arange(5)[None], slots=torch.tensor([0]), mixture=mixture)
            for pos in range(5, 9):
                step = graph(torch.tensor([[ids[pos]]]), 2, pos + 1 + 2, lowrank)[0, -1]
                error = (step - full[pos]).abs().max().item()
                effect = (full[pos] - plain[pos]).abs().max().item()
                # the int4 kernels return bfloat16: two roundings of the largest logit
                assert error <= 2 * torch.finfo(torch.bfloat16).eps * full[pos].abs().max().item()
                assert error < effect / 10
                assert step.argmax() == full[pos].argmax()
        assert graphs() == before


def test_adapters_loaded_after_compiling_decode_through_the_same_graphs(compiled_engines, tmp_path):
    """Mixtures of one or two adapters of different ranks, alone in a slot: the graph, no recompile,
    the eager tokens; while several sequences share a step, the eager batch."""
    path, engines = compiled_engines
    engine, graph = engines[None]
    make_peft_adapter(path, tmp_path / "a", seed=1, r=4, targets=("q_proj", "v_proj", "down_proj"))
    make_peft_adapter(path, tmp_path / "b", seed=2, r=2, targets=("k_proj", "o_proj", "up_proj", "gate_proj"))
    before = graphs()
    engine.load_adapter("a", tmp_path / "a")
    engine.load_adapter("b", tmp_path / "b")
    try:
        for mixtures in ([{"a": 1.0}, None, {"a": 0.3, "b": 0.7}], [{"b": 1.0}, {"a": 0.5, "b": 0.5}, None]):
            for lengths in ((3, 5, 9), (9, 3, 5), (4, 9, 3)):
                spy = CountCalls(graph)
                got = decode(engine, PROMPTS, lengths, mixtures=mixtures, compiled=spy)
                assert spy.calls == sorted(lengths)[-1] - sorted(lengths)[-2]  # every lone step
                assert got == decode(engine, PROMPTS, lengths, mixtures=mixtures, compiled=None)
        assert graphs() == before
        with_adapter = decode(engine, PROMPTS, (9, 1, 1), mixtures=[{"a": 1.0}, None, None], compiled=graph)[0]
        without = decode(engine, PROMPTS, (9, 1, 1), compiled=graph)[0]
        assert with_adapter != without  # the adapter really takes part in the graph
    finally:
        engine.unload_adapter("a")
        engine.unload_adapter("b")
        engine.model.compiled_decode = graph


def test_a_lone_sequences_mixture_is_prepared_once_and_again_when_its_adapter_changes(
        compiled_engines, tmp_path, monkeypatch):
    """The factors the graph takes are laid out at the sequence's first step and reused while it
    decodes alone, not laid out again every token; reloading the adapter under the same name
    mid-sequence gives the next steps its new factors, as the eager forward does."""
    from inference.engine import generate

    path, engines = compiled_engines
    engine, graph = engines[None]
    make_peft_adapter(path, tmp_path / "a", seed=1, r=4, targets=("q_proj", "v_proj", "down_proj"))
    make_peft_adapter(path, tmp_path / "a2", seed=7, r=4, targets=("q_proj", "v_proj", "down_proj"))
    prepared = CountCalls(generate.decode_lowrank)
    monkeypatch.setattr(generate, "decode_lowrank", prepared)

    def run(compiled, reload=True):
        engine.load_adapter("a", tmp_path / "a")
        engine.model.compiled_decode = compiled
        try:
            batch = engine.new_batch(max_batch=3, max_seq_len=64)
            seq = batch.add(Sequence(list(PROMPTS[1]), SamplingParams(max_tokens=14, ignore_eos=True),
                                     mixture={"a": 1.0}))
            for _ in range(6):
                batch.step()
            if reload:
                engine.load_adapter("a", tmp_path / "a2")  # the same name, other factors
            while len(batch):
                batch.step()
            return seq.output_ids
        finally:
            engine.unload_adapter("a")
            engine.model.compiled_decode = graph

    spy = CountCalls(graph)
    got = run(spy)
    assert spy.calls == 13  # every step after the prefill took the graph
    assert prepared.calls == 2  # once per adapter version
    eager = run(None)
    assert got == eager
    assert eager != run(None, reload=False)  # the reload changes the answer


def test_alternating_mixtures_reuse_their_layouts_until_an_adapter_changes(compiled_engines, tmp_path):
    """Requests that alternate between a few mixtures (routed chats) find each one's factors laid
    out from before (dora.DECODE_CACHE_SIZE of them); loading an adapter lays them out anew."""
    from inference.engine.dora import DECODE_CACHE_SIZE, mixture_vector

    path, engines = compiled_engines
    engine, _ = engines[None]
    model = engine.model
    with two_adapters(engine, path, tmp_path):
        names = model.adapter_context.names
        mixtures = [torch.stack([mixture_vector(m, names)]) for m in
                    ({"a": 1.0}, {"b": 1.0}, {"a": 0.5, "b": 0.5}, {"a": 0.2, "b": 0.8}, {"a": 0.9, "b": 0.1})]
        first = [graph_lowrank(model, m) for m in mixtures[:DECODE_CACHE_SIZE]]
        assert all(f is not None for f in first)
        again = [graph_lowrank(model, m) for m in reversed(mixtures[:DECODE_CACHE_SIZE])]
        assert all(a is f for a, f in zip(again, reversed(first)))
        graph_lowrank(model, mixtures[DECODE_CACHE_SIZE])  # one more: the least recent one goes
        assert graph_lowrank(model, mixtures[DECODE_CACHE_SIZE - 1]) is not first[-1]
        assert graph_lowrank(model, mixtures[0]) is first[0]
        make_peft_adapter(path, tmp_path / "a2", seed=9, r=3, targets=("q_proj", "o_proj", "up_proj", "down_proj"))
        engine.load_adapter("a", tmp_path / "a2")
        renewed = graph_lowrank(model, mixtures[0])
        assert renewed is not first[0]
        assert not torch.equal(renewed[0], first[0][0])  # the new adapter's factors


def test_adapters_targeting_a_projection_in_some_layers_only_decode_through_the_graph(compiled_engines, tmp_path):
    """decode_lowrank lays each adapter out over every layer (zeros where it targets nothing):
    an adapter on layer 1's q_proj and layer 0's down_proj only, mixed with one on every q_proj,
    gives the eager tokens through the graph."""
    path, engines = compiled_engines
    engine, graph = engines[None]
    make_peft_adapter(path, tmp_path / "a", seed=5, r=3,
                      targets=("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"))
    make_peft_adapter(path, tmp_path / "b", seed=6, r=4, targets=("q_proj",))
    engine.load_adapter("a", tmp_path / "a")
    engine.load_adapter("b", tmp_path / "b")
    try:
        mixtures = [None, {"a": 1.0}, {"a": 0.6, "b": 0.4}]
        for lengths in ((2, 3, 9), (2, 9, 3)):
            spy = CountCalls(graph)
            got = decode(engine, PROMPTS, lengths, mixtures=mixtures, compiled=spy)
            assert spy.calls == 6
            assert got == decode(engine, PROMPTS, lengths, mixtures=mixtures, compiled=None)
    finally:
        engine.unload_adapter("a")
        engine.unload_adapter("b")
        engine.model.compiled_decode = graph


def test_two_engines_of_one_shape_each_decode_through_their_own_graphs(compiled_engines, tmp_path):
    """The graphs hold their model's weights and KV cache and check nothing of the model on a step
    (Engine.compile_decode): a second engine of the same shapes in the same process builds graphs
    of its own, and each engine gives its own eager tokens."""
    from .conftest import make_tiny_llama

    _, engines = compiled_engines
    first, graph = engines[None]
    other = Engine.load(make_tiny_llama(tmp_path / "other", seed=5))
    other.new_batch(max_batch=3, max_seq_len=64)
    assert other.compile_decode(mixture_rank=0)
    lengths = (2, 3, 9)
    try:
        eager = {}
        for engine in (other, first):
            spy = CountCalls(engine.model.compiled_decode)
            got = decode(engine, PROMPTS, lengths, compiled=spy)
            assert spy.calls == 6
            eager[engine] = decode(engine, PROMPTS, lengths, compiled=None)
            assert got == eager[engine]
        assert eager[first] != eager[other]
    finally:
        first.model.compiled_decode = graph


def test_the_graph_takes_every_mixture_width_up_to_its_most_and_wider_ones_decode_eagerly(compiled_engines, tmp_path):
    """The mixture's width (its ranks summed per projection, rounded up to a multiple of 8) is a
    symbol of the graph: r=4 alone (width 8), r=21 alone (24), r=21 + r=4 (32) take the one graph
    built at width 24; r=21 + r=45 (72) is over compile_decode's most (64) and runs eagerly; all
    with the eager tokens, no new graph."""
    path, engines = compiled_engines
    engine, graph = engines[None]
    assert engine.model.compiled_mixture_rank == 64
    make_peft_adapter(path, tmp_path / "wide", seed=5, r=21, targets=("q_proj", "o_proj", "gate_proj"))
    make_peft_adapter(path, tmp_path / "narrow", seed=6, r=4, targets=("q_proj", "down_proj"))
    make_peft_adapter(path, tmp_path / "wider", seed=7, r=45, targets=("o_proj", "up_proj"))
    for name in ("wide", "narrow", "wider"):
        engine.load_adapter(name, tmp_path / name)
    before = graphs()
    try:
        for mixture, width, graph_steps in (({"narrow": 1.0}, 8, 4), ({"wide": 1.0}, 24, 4),
                                            ({"wide": 0.5, "narrow": 0.5}, 32, 4), ({"wide": 0.5, "wider": 0.5}, 72, 0)):
            if width <= 64:
                lowrank = graph_lowrank(engine.model, engine.mixture_matrix([Sequence([1], mixture=mixture)]))
                assert lowrank[0].shape[1] == width  # F [L, W, n]: the factors packed at the mixture's width
            spy = CountCalls(graph)
            mixtures = [mixture, None, None]
            got = decode(engine, PROMPTS, (9, 3, 5), mixtures=mixtures, compiled=spy)
            assert spy.calls == graph_steps  # the 4 steps the first sequence decodes alone
            assert got == decode(engine, PROMPTS, (9, 3, 5), mixtures=mixtures, compiled=None)
        # A batch's adapters together: widths 32 and 72 (at most 128) take the one batch graph.
        for mixtures in ([{"wide": 1.0}, {"narrow": 1.0}, {"wide": 0.5, "narrow": 0.5}],
                         [{"wide": 1.0}, {"wider": 1.0}, None]):
            spy = CountCalls(engine.model.compiled_rows)
            got = decode(engine, PROMPTS, (6, 6, 6), mixtures=mixtures, compiled=graph, rows=spy)
            assert spy.calls == 5
            assert got == decode(engine, PROMPTS, (6, 6, 6), mixtures=mixtures)
        assert graphs() == before
    finally:
        for name in ("wide", "narrow", "wider"):
            engine.unload_adapter(name)
        engine.model.compiled_decode = graph


@pytest.mark.parametrize("quant", [None, "int4"])
def test_compiled_batches_give_the_eager_tokens_for_runs_of_slots_and_fall_back_otherwise(
        compiled_engines, quant, tmp_path):
    """Several sequences share a step through the batch graph while their slots are one ascending
    run (from slot 0 or later), with or without per-sequence mixtures; slots 0 and 2 alone run
    eagerly. Tokens as the eager batch gives them (int4 mixtures: compared by logits below)."""
    path, engines = compiled_engines
    engine, graph = engines[quant]
    rows = engine.model.compiled_rows
    assert rows is not None and engine.model.compiled_rows_rank == 128
    make_peft_adapter(path, tmp_path / "a", seed=1, r=4, targets=("q_proj", "v_proj", "down_proj"))
    make_peft_adapter(path, tmp_path / "b", seed=2, r=2, targets=("k_proj", "o_proj", "up_proj", "gate_proj"))
    engine.load_adapter("a", tmp_path / "a")
    engine.load_adapter("b", tmp_path / "b")
    cases = [
        ((6, 6, 6), 5),  # slots 0-2 together for every step after the prefill
        ((2, 7, 7), 6),  # slot 0 leaves first: then slots 1-2, a run from slot 1
        ((7, 2, 7), 1),  # slot 1 leaves first: slots 0 and 2 are no run, eager
    ]
    mixture_sets = [None] if quant == "int4" else [None, [{"a": 1.0}, {"a": 0.3, "b": 0.7}, None]]
    try:
        for mixtures in mixture_sets:
            for lengths, rows_steps in cases:
                spy = CountCalls(rows)
                got = decode(engine, PROMPTS, lengths, mixtures=mixtures, compiled=graph, rows=spy)
                assert spy.calls == rows_steps, (lengths, mixtures)
                assert got == decode(engine, PROMPTS, lengths, mixtures=mixtures)
    finally:
        engine.unload_adapter("a")
        engine.unload_adapter("b")
        engine.model.compiled_decode = graph


@pytest.mark.parametrize("quant", [None, "int4"])
def test_the_batch_graph_takes_every_batch_size_and_mixture_within_its_tolerance(compiled_engines, quant, tmp_path):
    """The batch graph called directly (no eager fallback can hide a recompile) for 2 and 3 rows
    from slots 0 and 1, each row its own mixture of adapters of different ranks and targets:
    logits as the eager forward's (float32: 1e-4; int4, bfloat16 factors: two bfloat16 roundings
    and the same greedy token), no new graph."""
    path, engines = compiled_engines
    engine, _ = engines[quant]
    model, rows = engine.model, engine.model.compiled_rows
    ids = [IDS[:9], IDS[1:10], IDS[2:11]]
    with two_adapters(engine, path, tmp_path), torch.inference_mode():
        before = graphs()
        for start, mixture in ((0, torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 0.0]])),
                               (1, torch.tensor([[0.0, 1.0], [0.5, 0.5]])),
                               (0, None)):
            n = 2 if mixture is None else mixture.shape[0]
            full = model(torch.tensor(ids[:n]), mixture=mixture)  # eager, no cache, float32 factors
            model.adapter_context.set_mixture(mixture)
            try:
                lowrank = None if mixture is None else dora_rows(model, n)
            finally:
                model.adapter_context.set_mixture(None)
            slots = torch.arange(start, start + n)
            model(torch.tensor([i[:5] for i in ids[:n]]), input_pos=torch.arange(5).expand(n, 5), slots=slots,
                  mixture=mixture)
            for pos in range(5, 9):
                tokens = torch.tensor([[i[pos]] for i in ids[:n]])
                step = rows(tokens, torch.full((n, 1), pos), start + 2, pos + 1 + 2, lowrank)[:, -1]
                error = (step - full[:, pos]).abs().max().item()
                if quant is None:
                    assert error < 1e-4
                else:
                    assert error <= 2 * torch.finfo(torch.bfloat16).eps * full[:, pos].abs().max().item()
                    assert torch.equal(step.argmax(-1), full[:, pos].argmax(-1))
        assert graphs() == before


def dora_rows(model, n):
    from inference.engine.dora import decode_lowrank

    return decode_lowrank(model, model.compiled_rows_rank, model.compiled_mixture_dtype, rows=n)


def test_a_larger_kv_cache_drops_the_graph_and_decodes_eagerly(compiled_engines):
    path, _ = compiled_engines
    engine = Engine.load(path)
    engine.new_batch(max_batch=1, max_seq_len=32)
    engine.model.compiled_decode = CountCalls(lambda *a: pytest.fail("a graph built for the old cache ran"))
    batch = engine.new_batch(max_batch=2, max_seq_len=64)
    assert engine.model.compiled_decode is None and engine.model.compiled_rows is None
    seq = batch.add(Sequence(IDS[:5], SamplingParams(max_tokens=4, ignore_eos=True)))
    while len(batch):
        batch.step()
    assert len(seq.output_ids) == 4


def test_compile_failure_leaves_the_engine_decoding_eagerly(compiled_engines):
    """A machine without a working C++ compiler: Inductor's build fails, the engine says so and
    stays eager (the compiler is pointed at a path that does not exist; nothing is mocked)."""
    import torch._inductor.config as inductor_config

    path, _ = compiled_engines
    engine = Engine.load(path)
    engine.new_batch(max_batch=1, max_seq_len=32)
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        assert engine.compile_decode() is False
    assert engine.model.compiled_decode is None
    assert len(list(engine.generate("hi", max_tokens=3, ignore_eos=True))) >= 1


def test_sequences_decode_while_the_graphs_compile_and_the_graphs_never_read_the_adapter_context(
        compiled_engines, tmp_path, monkeypatch):
    """Neither dynamo's trace nor AOT autograd's takes the engine lock (on a warm Inductor cache
    tracing is most of the compile; on a cold one AOT autograd traces for 20-40 s per graph): two
    sequences, in slots 0 and 1 whose KV position 1 the warm-up steps write (and put back), step
    while the first dynamo trace is held at its start, then while the first AOT trace is held at its
    first op, with nn.Module.__call__ patched by torch.fx for every thread. Every trace runs with
    the adapter context as an eager mixture step in another thread leaves it mid-forward; the graphs
    read none of it: a mixture sequence and a plain one, first batched, then the plain one alone,
    give the eager tokens through the graphs (counted as they run: a graph whose guards fail would
    run the step eagerly). The steps taken while the graphs compile run on one intra-op thread.
    The dynamo start callback and the tracer's create_node only hold the traces (AOT autograd's
    cache is off, so that it traces); Inductor's compile is wrapped only to count the graphs' runs."""
    import threading

    from torch.fx.experimental import proxy_tensor

    from inference.engine import engine as engine_module

    runs = []
    real_compile_fx = engine_module.compile_fx

    def counted_compile_fx(*args, **kwargs):
        graph = real_compile_fx(*args, **kwargs)

        def run(*inputs):
            runs.append(1)
            return graph(*inputs)

        return run

    monkeypatch.setattr(engine_module, "compile_fx", counted_compile_fx)
    path, _ = compiled_engines
    engine = Engine.load(path)
    engine.new_batch(max_batch=3, max_seq_len=64)
    mix = [{"a": 0.6, "b": 0.4}, None, None]
    with two_adapters(engine, path, tmp_path):
        reference = decode(engine, PROMPTS, (12, 20, 1), mixtures=mix)
        ctx = engine.model.adapter_context
        batch = engine.new_batch(max_batch=3, max_seq_len=64)
        seqs = [batch.add(Sequence(list(ids), SamplingParams(max_tokens=n, ignore_eos=True), mixture=m))
                for ids, n, m in zip(PROMPTS[:2], (12, 20), mix)]
        batch.step()
        tracing, stepped, result = threading.Event(), threading.Event(), []
        aot_tracing, aot_stepped, patched = threading.Event(), threading.Event(), []
        module_call = torch.nn.Module.__call__  # torch.fx patches it while make_fx traces

        def compile_decode():
            torch._functorch.config.enable_autograd_cache = False  # this thread's: AOT autograd traces
            result.append(engine.compile_decode())

        compiler = threading.Thread(target=compile_decode)

        def hold_trace(args):
            if threading.current_thread() is compiler:
                tracing.set()
                assert stepped.wait(60)
                ctx.set_mixture(torch.tensor([[0.6, 0.4]]))  # mid-forward state of an eager mixture step

        real_create_node = proxy_tensor.PythonKeyTracer.create_node

        def hold_aot_trace(tracer, kind, *args, **kwargs):
            if threading.current_thread() is compiler and kind == "call_function" and not aot_tracing.is_set():
                patched.append(torch.nn.Module.__call__ is not module_call)  # torch.fx's, for every thread
                aot_tracing.set()
                assert aot_stepped.wait(60)
            return real_create_node(tracer, kind, *args, **kwargs)

        monkeypatch.setattr(proxy_tensor.PythonKeyTracer, "create_node", hold_aot_trace)
        threads = torch.get_num_threads()
        step_threads = []  # intra-op threads of the steps taken while the graphs compile
        torch._dynamo.callback_handler.register_start_callback(hold_trace)
        try:
            compiler.start()
            assert tracing.wait(60)
            hook = engine.model.lm_head.register_forward_pre_hook(
                lambda *_: step_threads.append(torch.get_num_threads()))
            for _ in range(5):
                batch.step()  # the engine lock is free while dynamo traces
            hook.remove()  # before the trace goes on: dynamo would trace the hook
            assert [len(s.output_ids) for s in seqs] == [6, 6] and compiler.is_alive()
            assert step_threads == [1] * 5 and torch.get_num_threads() == threads  # one thread, then back
            stepped.set()
            assert aot_tracing.wait(120)
            # In a thread: should AOT autograd's trace hold the lock, the steps wait until it ends.
            hook = engine.model.lm_head.register_forward_pre_hook(
                lambda *_: step_threads.append(torch.get_num_threads()))
            stepper = threading.Thread(target=lambda: [batch.step() for _ in range(3)])
            stepper.start()
            stepper.join(60)
            stepped_while_aot_traced = not stepper.is_alive()
            hook.remove()
            aot_stepped.set()
            stepper.join(60)
            assert stepped_while_aot_traced and patched == [True]
            assert [len(s.output_ids) for s in seqs] == [9, 9] and step_threads == [1] * 8
            compiler.join(300)
        finally:
            torch._dynamo.callback_handler.remove_start_callback(hold_trace)
            stepped.set()
            aot_stepped.set()
            ctx.set_mixture(None)
        assert result == [True]
        runs.clear()
        while len(batch):
            batch.step()
        assert len(runs) == 3 + 8  # every later step ran a graph: 3 batched, 8 alone
        assert [s.output_ids for s in seqs] == reference[:2]


def test_a_model_with_biased_projections_compiles_without_mixture_graphs(tmp_path):
    """Qwen-style attention biases: mixtures combine per projection (eager); the adapter-free
    graphs still build, and adapters still apply (the worker must not fail to load)."""
    from .conftest import make_tiny_llama

    path = make_tiny_llama(tmp_path / "biased", attention_bias=True)
    engine = Engine.load(path)
    engine.new_batch(max_batch=3, max_seq_len=64)
    assert engine.compile_decode(mixture_rank=24) is True
    assert engine.capabilities()["compiled_mixture_rank"] == 0
    graph = engine.model.compiled_decode
    make_peft_adapter(path, tmp_path / "ad", targets=("q_proj", "v_proj", "down_proj"))
    engine.load_adapter("ad", tmp_path / "ad")
    for mixtures, graph_steps in (([None, None, None], 4), ([{"ad": 1.0}, None, None], 0)):
        spy = CountCalls(graph)
        got = decode(engine, PROMPTS, (9, 3, 5), mixtures=mixtures, compiled=spy)
        assert spy.calls == graph_steps
        assert got == decode(engine, PROMPTS, (9, 3, 5), mixtures=mixtures, compiled=None)


def test_compile_decode_needs_the_serving_kv_cache(tiny_llama_dir):
    from inference.engine import EngineError

    with pytest.raises(EngineError, match="new_batch"):
        Engine.load(tiny_llama_dir).compile_decode()
