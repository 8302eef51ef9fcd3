"""The hybrid router's stages: keyword, semantic (real all-MiniLM-L6-v2), fusion, gating, CLI."""

import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from inference.experts import EXPERTS, GENERAL_ID
from inference.models import Adapter
from inference.router import hybrid, keyword, semantic

ALL = set(EXPERTS)


# --- registry -----------------------------------------------------------------------------------

def test_registry_has_every_seed_expert_with_bilingual_examples():
    expected = {"medical", "legal", "coding", "finance", "science", "history", "education", "turkish", "german",
                "french", "spanish", "arabic", "chinese", "summarization", "translation", "qa", "creative",
                "analysis", "general"}
    assert set(EXPERTS) == expected
    for expert in EXPERTS.values():
        assert 15 <= len(expert.examples) <= 20, expert.id
        turkish = [q for q in expert.examples if any(c in q for c in "çğışöüÇĞİŞÖÜ")]
        assert len(turkish) >= 3, f"{expert.id} needs Turkish examples"
        assert len(expert.examples) - len(turkish) >= 7, f"{expert.id} needs English examples"
        assert expert.keywords and expert.description


# --- stage 1: keywords ----------------------------------------------------------------------------

def test_turkish_coding_query_takes_the_keyword_fast_path():
    result = keyword.route("Python'da for loop nasıl yazılır?")
    assert result.scores["coding"] >= 0.85
    assert result.hits["coding"] == ["python", "for loop"]


def test_more_distinct_keyword_hits_give_more_confidence():
    one = keyword.route("I have a fever").scores["medical"]
    three = keyword.route("Diyabet hastalarında insülin direnci nasıl tedavi edilir?").scores["medical"]
    assert one == keyword.confidence_for(1) < three == keyword.confidence_for(3)


def test_turkish_suffixes_and_dotted_capital_i_still_match():
    assert "legal" in keyword.route("İŞ SÖZLEŞMESİNİ feshettim").scores
    assert "medical" in keyword.route("Diyabetli babam için").scores


def test_text_written_in_a_language_is_weak_evidence_for_its_expert():
    scores = keyword.route("Wie geht es dir?").scores
    assert scores["german"] == keyword.DETECT_CONFIDENCE < 0.5
    assert keyword.route("你好吗").scores["chinese"] == keyword.DETECT_CONFIDENCE
    assert keyword.route("How do German articles work?").scores["german"] > keyword.DETECT_CONFIDENCE


def test_vague_query_has_no_confident_keyword():
    assert keyword.route("Bu konuyu açıklar mısın?").confidence < 0.85


# --- stage 2: semantic ----------------------------------------------------------------------------

def test_semantic_scores_are_the_best_cosine_over_an_experts_examples(tmp_path):
    router = semantic.SemanticRouter(tmp_path, {"coding": ("how to sort a list in python", "fix a null pointer"),
                                                "medical": ("symptoms of the flu",)})
    scores = router.route("how do I sort a python list").scores
    example = router.embed("how to sort a list in python")
    assert scores["coding"] == pytest.approx(float(example @ router.embed("how do I sort a python list")), abs=1e-3)
    assert scores["coding"] > scores["medical"]


def test_example_embeddings_are_cached_on_disk_keyed_by_the_examples(tmp_path):
    examples = {"coding": ("sort a list",), "medical": ("flu symptoms",)}
    first = semantic.SemanticRouter(tmp_path, examples)
    assert first.cache_path.exists()
    mtime = first.cache_path.stat().st_mtime_ns
    again = semantic.SemanticRouter(tmp_path, examples)
    assert again.cache_path == first.cache_path and again.cache_path.stat().st_mtime_ns == mtime
    changed = semantic.SemanticRouter(tmp_path, {**examples, "medical": ("flu symptoms", "a cough")})
    assert changed.cache_path != first.cache_path and changed.matrix.shape[0] == 3


# --- stages 3 and 4: fusion and gating -------------------------------------------------------------

def test_fusion_weights_keyword_and_semantic_scores(settings):
    settings.R3MES_ROUTER_KEYWORD_WEIGHT, settings.R3MES_ROUTER_SEMANTIC_WEIGHT = 0.3, 0.7
    fused = hybrid.fuse({"coding": 0.65}, {"coding": 0.5, "medical": 0.9})
    assert fused == pytest.approx({"coding": 0.3 * 0.65 + 0.7 * 0.5, "medical": 0.7 * 0.9})


@pytest.mark.parametrize("free_gb,k", [(4, 1), (7.9, 1), (8, 2), (16, 2), (16.1, 3), (80, 3)])
def test_memory_budget_decides_how_many_experts_mix(free_gb, k):
    assert hybrid.max_experts_for(free_gb) == k


def test_cpu_gating_uses_the_ram_budget_setting(settings):
    settings.R3MES_ROUTER_CPU_BUDGET_GB = 4
    assert hybrid.max_experts_for(hybrid.memory_budget_gb("cpu")) == 1
    settings.R3MES_ROUTER_CPU_BUDGET_GB = 32
    assert hybrid.max_experts_for(hybrid.memory_budget_gb("cpu")) == 3


def test_gating_keeps_top_k_and_renormalises_weights(settings):
    settings.R3MES_ROUTER_MIN_RELATIVE_SCORE = 0.0
    experts, fallback = hybrid.gate({"medical": 0.9, "turkish": 0.6, "coding": 0.3}, ALL, 2)
    assert not fallback
    assert experts == [("medical", pytest.approx(0.6)), ("turkish", pytest.approx(0.4))]


def test_gating_drops_experts_far_below_the_best(settings):
    settings.R3MES_ROUTER_MIN_RELATIVE_SCORE = 0.75
    experts, _ = hybrid.gate({"medical": 0.9, "turkish": 0.6}, ALL, 3)
    assert experts == [("medical", 1.0)]


def test_gating_falls_back_to_general_when_nothing_scores_half(settings):
    settings.R3MES_ROUTER_FALLBACK_THRESHOLD = 0.5
    assert hybrid.gate({"medical": 0.49, "coding": 0.2}, ALL, 3) == ([(GENERAL_ID, 1.0)], True)
    assert hybrid.gate({"medical": 0.49}, ALL - {GENERAL_ID}, 3) == ([], True)


def test_gating_only_considers_servable_experts():
    experts, _ = hybrid.gate({"medical": 0.95, "coding": 0.7}, {"coding", GENERAL_ID}, 1)
    assert experts == [("coding", 1.0)]


def test_confident_keyword_query_skips_the_semantic_stage():
    result = hybrid.route("Diyabet hastalarında insülin direnci nasıl tedavi edilir?", all_experts=True, max_experts=1)
    assert result.fast_path and result.semantic_scores == {} and result.timings["semantic_ms"] == 0
    assert result.experts == [("medical", 1.0)]


def test_query_without_keywords_is_routed_by_meaning():
    result = hybrid.route("Why did the Titanic sink in 1912?", all_experts=True, max_experts=1)
    assert not result.fast_path and result.semantic_scores
    assert result.top == "history"
    assert result.scores["history"] == pytest.approx(
        0.3 * result.keyword_scores.get("history", 0) + 0.7 * result.semantic_scores["history"])


def test_routing_reads_servable_experts_from_approved_adapters(db):
    Adapter.objects.create(expert="coding", version=1, sha256="0" * 64, status=Adapter.Status.APPROVED)
    Adapter.objects.create(expert="medical", version=1, sha256="0" * 64, status=Adapter.Status.CANDIDATE)
    medical = "Diyabet hastalarında insülin direnci nasıl tedavi edilir?"
    assert hybrid.route(medical).experts == []  # medical is not servable, general has no adapter
    assert hybrid.route("How do I reverse a list in Python?").experts == [("coding", 1.0)]
    assert hybrid.route(medical, all_experts=True).top == "medical"


def test_excluded_expert_is_never_chosen():
    result = hybrid.route("Python'da for loop nasıl yazılır?", all_experts=True, exclude={"coding"})
    assert "coding" not in dict(result.experts)


# --- CLI ------------------------------------------------------------------------------------------

def test_route_command_prints_one_json_object(capsys, db):
    call_command("r3mes", "route", "Python'da for loop nasıl yazılır?", "--json", "--all-experts")
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"query", "experts", "fast_path", "scores"}
    assert data["experts"] == [["coding", 1.0]] and data["fast_path"] is True


def test_route_command_reads_queries_from_a_file(tmp_path, capsys, db):
    path = tmp_path / "queries.txt"
    path.write_text("How do I reverse a list in Python?\n\nSummarize this article in three bullet points\n")
    call_command("r3mes", "route", "--file", str(path), "--json", "--all-experts")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["experts"][0][0] for line in lines] == ["coding", "summarization"]


def test_route_command_rejects_empty_and_missing_input(tmp_path, db):
    with pytest.raises(CommandError, match="empty"):
        call_command("r3mes", "route", "   ")
    with pytest.raises(CommandError, match="no such file"):
        call_command("r3mes", "route", "--file", str(tmp_path / "nope.txt"))
    with pytest.raises(CommandError, match="either"):
        call_command("r3mes", "route")
