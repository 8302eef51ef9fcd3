"""The pipeline end to end on the real model with a really trained DoRA adapter."""

import pytest

from inference.adapter_cache import AdapterCache
from inference.experts import EXPERTS
from inference.pipeline import Options, Pipeline, PipelineError, PipelineResult
from tests.inference.helpers import make_adapter_row, save_identity_adapter, serving_engine  # noqa: F401

QUERY = [{"role": "user", "content": "How do I reverse a list in Python?"}]


@pytest.fixture(scope="module")
def coding_dir(serving_engine, tmp_path_factory):  # noqa: F811
    """A coding adapter trained for a few steps with a high learning rate on the starter data: enough
    to move greedy output, which is all these tests need."""
    from inference.engine.train import TrainConfig, train_dora
    from inference.starters import load_examples

    out = tmp_path_factory.mktemp("pipeline_adapters") / "coding"
    train_dora(serving_engine, load_examples("coding")[:16], TrainConfig(rank=4, alpha=8, lr=1e-2, steps=6, batch_size=2,
                                                                       max_len=128), adapter="ptrain", save_to=out)
    serving_engine.unload_adapter("ptrain")
    return out


@pytest.fixture(scope="module")
def general_dir(serving_engine, tmp_path_factory):  # noqa: F811
    return save_identity_adapter(serving_engine, "pgeneral", tmp_path_factory.mktemp("pipeline_general") / "general")


@pytest.fixture
def pipe(serving_engine, db):  # noqa: F811
    cache = AdapterCache(serving_engine, 256 * 2**20, 512 * 2**20)
    yield Pipeline(serving_engine, cache)
    cache.close()
    for name in list(cache.device_lru):
        serving_engine.unload_adapter(name)


def test_chosen_expert_changes_the_output(pipe, coding_dir):
    base = pipe.run(QUERY, Options(max_tokens=12))
    assert base.experts == []  # nothing servable yet: the base model answers
    make_adapter_row("coding", 1, coding_dir)
    routed = pipe.run(QUERY, Options(max_tokens=12))
    assert routed.experts == [("coding", 1.0)]
    assert routed.text and base.text and routed.text != base.text
    forced = pipe.run([{"role": "user", "content": "Tell me about the weather."}],
                      Options(max_tokens=12, experts=["coding"]))
    assert forced.experts == [("coding", 1.0)] and forced.routing is None


def test_result_carries_stage_metrics_and_cache_tiers(pipe, coding_dir):
    make_adapter_row("coding", 1, coding_dir)
    query = [{"role": "user", "content": "How do I write a for loop in Python?"}]  # two keywords: fast path
    first = pipe.run(query, Options(max_tokens=6))
    second = pipe.run(query, Options(max_tokens=6))
    m = first.metrics
    for key in ("total_ms", "retrieval_ms", "routing_ms", "adapter_loading_ms", "time_to_first_token_ms",
                "tokens", "tokens_per_s", "fast_path", "keyword_confidence", "cache_hits", "cache_misses", "backend"):
        assert key in m, key
    assert 0 < m["tokens"] <= 6 and m["backend"].startswith("pytorch")
    assert m["fast_path"] is True and m["keyword_confidence"] >= 0.85
    assert (m["cache_hits"], m["cache_misses"]) == (0, 1) and m["cache_tiers"] == {"coding-v1": "disk"}
    assert (second.metrics["cache_hits"], second.metrics["cache_misses"]) == (1, 0)
    assert m["time_to_first_token_ms"] <= m["total_ms"]
    stats = pipe.stats()
    assert stats["requests"] == 2 and stats["fast_path_rate"] == 1.0 and stats["cache_hit_rate"] == 0.5
    assert stats["expert_usage"] == {"coding": 2}


def test_stream_yields_text_pieces_then_the_result(pipe):
    items = list(pipe.stream(QUERY, Options(max_tokens=5)))
    assert isinstance(items[-1], PipelineResult)
    assert all(isinstance(piece, str) for piece in items[:-1])
    assert "".join(items[:-1]) == items[-1].text


def test_corrupt_adapter_is_skipped_and_routing_falls_back(pipe, coding_dir, general_dir, serving_engine):  # noqa: F811
    coding = make_adapter_row("coding", 1, coding_dir)
    coding.sha256 = "0" * 64
    coding.save()
    make_adapter_row("general", 1, general_dir)
    result = pipe.run(QUERY, Options(max_tokens=4))
    assert result.experts == [("general", 1.0)]
    assert "sha256" in result.skipped["coding"]
    assert "coding-v1" not in serving_engine.adapters


def test_forced_corrupt_adapter_is_an_error(pipe, coding_dir):
    coding = make_adapter_row("coding", 1, coding_dir)
    coding.sha256 = "0" * 64
    coding.save()
    with pytest.raises(PipelineError, match="checksum"):
        pipe.run(QUERY, Options(max_tokens=4, experts=["coding"]))


@pytest.mark.parametrize("messages", [[], [{"role": "user", "content": "   "}], [{"role": "system", "content": "x"}],
                                      [{"role": "robot", "content": "hi"}]])
def test_empty_or_malformed_queries_are_rejected(pipe, messages):
    with pytest.raises(PipelineError) as err:
        pipe.run(messages)
    assert err.value.param == "messages"


def test_unknown_forced_expert_lists_the_valid_choices(pipe):
    with pytest.raises(PipelineError, match="unknown expert") as err:
        pipe.run(QUERY, Options(experts=["astrology"]))
    assert err.value.choices == list(EXPERTS)


def test_forced_expert_without_adapter_lists_the_servable_ones(pipe, coding_dir):
    make_adapter_row("coding", 1, coding_dir)
    with pytest.raises(PipelineError, match="without an approved adapter") as err:
        pipe.run(QUERY, Options(experts={"medical": 1.0}))
    assert err.value.choices == ["coding"]


def test_query_over_the_context_length_is_rejected(pipe, serving_engine):  # noqa: F811
    long = " ".join(["word"] * (serving_engine.config.max_seq_len + 10))
    with pytest.raises(PipelineError, match="context length"):
        pipe.run([{"role": "user", "content": long}], Options(max_tokens=8))


@pytest.mark.parametrize("options", [Options(max_tokens=0), Options(temperature=-1), Options(top_p=0),
                                     Options(top_k=-2)])
def test_bad_sampling_options_are_rejected(pipe, options):
    with pytest.raises(PipelineError):
        pipe.run(QUERY, options)


def test_without_a_user_or_readable_passages_there_is_no_context(pipe, alice):
    result = pipe.run(QUERY, Options(max_tokens=3, rag=True))
    assert result.sources == [] and result.metrics["retrieved"] == 0
    # alice can read no collection: retrieval runs and finds nothing, so nothing is made up
    assert pipe.run(QUERY, Options(max_tokens=3, rag=True), user=alice).metrics["retrieved"] == 0
