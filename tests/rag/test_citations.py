"""Which sources an answer cites: [n] markers first, otherwise attribution by the words the answer
sentences take from a source. The passages are the evaluation documents in tests/data/rag/ and
several answers are ones SmolLM2-135M really wrote for these questions (benchmarks/RESULTS.md)."""

from pathlib import Path

import pytest

from rag.citations import attributed_numbers, cited_sources, format_sources, with_sources
from rag.retrieval import Result, retrieve
from tests.rag.pdfs import make_pdf

DOCUMENTS = Path(__file__).resolve().parents[1] / "data" / "rag" / "documents"
PUBLIC = "Honeybees communicate the direction of flowers with a waggle dance inside the hive."


def passages(*names):
    """Each paragraph of the named evaluation documents as a retrieved passage, in that order."""
    results = []
    for name in names:
        for page, paragraph in enumerate((DOCUMENTS / name).read_text().split("\n\n")[1:], start=1):
            text = " ".join(paragraph.split())
            results.append(Result(
                chunk_id=len(results) + 1, document_id=100 + len(results), document_title=name, collection_id=1,
                collection="eval", page=page, snippet=text[:240], text=text, dense_score=0.5, bm25_score=1.0,
                fused_score=0.03,
            ))
    return results


@pytest.fixture
def results():
    # beekeeping.md paragraphs are sources 1-4, volcanoes.md paragraphs 5-8.
    return passages("beekeeping.md", "volcanoes.md")


def test_an_answer_copying_a_passage_cites_it(results):
    question = "How fast can a pyroclastic flow move?"
    answer = "Pyroclastic flows are fast avalanches of hot gas and volcanic ash that can exceed 100 kilometres per hour."
    [source] = cited_sources(answer, results, question)
    assert source["n"] == 8 and source["title"] == "volcanoes.md" and source["page"] == 4
    assert source["cited"] == "attributed"
    assert source["quote"].startswith("Pyroclastic flows are fast avalanches of hot gas")


def test_a_paraphrase_that_keeps_the_facts_cites_its_passage(results):
    question = "What temperature do bees keep the middle of their winter cluster at?"
    answer = "They shiver their flight muscles so the centre of the cluster stays near 35 degrees Celsius."
    assert [s["n"] for s in cited_sources(answer, results, question)] == [1]


def test_an_unrelated_answer_cites_nothing(results):
    question = "How fast can a pyroclastic flow move?"
    assert cited_sources("I am sorry, I cannot help with that request. Please ask me something else.",
                         results, question) == []
    assert cited_sources("The capital of France is Paris, a city on the Seine.", results, question) == []


def test_an_answer_that_only_repeats_the_question_cites_nothing(results):
    question = "What happens to the varroa mite population when beekeepers treat the colony?"
    answer = "When beekeepers treat the colony, the varroa mite population changes."
    assert cited_sources(answer, results, question) == []


def test_made_up_answers_on_the_topic_cite_nothing(results):
    # SmolLM2-135M's real answers to two evaluation questions: on topic, wrong, not from the sources.
    assert cited_sources("A queen bee can lay up to 200 eggs per day.", results,
                         "How many eggs can a queen bee lay per day?") == []
    made_up = ("A pyroclastic flow is a fast-moving, hot, and explosive volcanic rock that can travel at speeds "
               "of up to 1000 meters per second. This is because pyroclastic flows are composed of hot, viscous "
               "rock that can flow rapidly and with incredible speed.")
    assert cited_sources(made_up, results, "How fast can a pyroclastic flow move?") == []


def test_each_sentence_is_credited_to_its_best_source_in_answer_order(results):
    answer = ("Basaltic magma is runny and low in silica, so lava flows far. "
              "Beekeepers count mites with a sugar roll or an alcohol wash of about 300 bees.")
    cited = cited_sources(answer, results, "Tell me about magma and mites.")
    assert [(s["n"], s["title"]) for s in cited] == [(6, "volcanoes.md"), (3, "beekeeping.md")]
    assert set(attributed_numbers(answer, results)) == {6, 3}


def test_valid_markers_win_over_attribution(results):
    # The copied sentence is from source 8, but the answer names source 5 with a marker.
    answer = "Pyroclastic flows are fast avalanches of hot gas and volcanic ash [5]."
    [source] = cited_sources(answer, results, "How fast can a pyroclastic flow move?")
    assert source["n"] == 5 and source["cited"] == "marker"
    # Markers outside 1..len(results) are ignored, so attribution takes over.
    [source] = cited_sources("Pyroclastic flows are fast avalanches of hot gas and volcanic ash [42].", results, "")
    assert source["n"] == 8 and source["cited"] == "attributed"


def test_no_results_means_no_sources():
    assert cited_sources("Anything [1].", [], "q") == []


@pytest.mark.django_db
def test_sources_are_numbered_before_the_question_in_the_last_user_message(collection, add_and_ingest, alice):
    add_and_ingest(collection, "geo.pdf", make_pdf(["Intro page.", "Volcanoes erupt when magma pressure builds up."]))
    add_and_ingest(collection, "bees.txt", PUBLIC.encode())
    results = retrieve("volcano magma", alice, top_k=2)
    block = format_sources(results)
    assert block.splitlines()[0] == "[1] geo.pdf (p. 2): Volcanoes erupt when magma pressure builds up."
    assert block.splitlines()[1].startswith(f"[2] {results[1].document_title} (p. {results[1].page}):")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Why do volcanoes erupt?"}]
    prompt = with_sources(chat, results)
    assert prompt[:2] == chat[:2] and chat[2]["content"] == "Why do volcanoes erupt?"  # the input is not changed
    assert prompt[2] == {"role": "user", "content": f"{block}\n\nQuestion: Why do volcanoes erupt?"}
    assert with_sources(chat, []) == chat


@pytest.mark.django_db
def test_cited_sources_by_marker_link_to_the_document_page(collection, add_and_ingest, alice):
    add_and_ingest(collection, "geo.pdf", make_pdf(["Intro page.", "Volcanoes erupt when magma pressure builds up."]))
    add_and_ingest(collection, "bees.txt", PUBLIC.encode())
    results = retrieve("volcano magma bees", alice, top_k=2)
    by_title = {r.document_title: n for n, r in enumerate(results, start=1)}
    n_geo, n_bees = by_title["geo.pdf"], by_title["bees.txt"]
    answer = f"Magma pressure makes volcanoes erupt [{n_geo}]. See also [{n_geo}, 9] and [0]."
    [source] = cited_sources(answer, results)
    assert source["n"] == n_geo and source["title"] == "geo.pdf" and source["page"] == 2
    assert source["url"] == f"/documents/{results[n_geo - 1].document_id}/#page-2"
    assert "magma" in source["snippet"] and source["cited"] == "marker"
    both = cited_sources(f"Bees dance [{n_bees}]; magma [{n_geo}].", results)
    assert [s["n"] for s in both] == [n_bees, n_geo]
    # Without markers, a sentence drawn from the PDF page still cites it, with its link.
    [source] = cited_sources("Volcanoes erupt when magma pressure builds up.", results, "Why do volcanoes erupt?")
    assert source["title"] == "geo.pdf" and source["cited"] == "attributed" and source["url"].endswith("#page-2")
