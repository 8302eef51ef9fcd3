"""The retrieval evaluation set (tests/data/rag/, also used by benchmarks/rag.py) and a floor on
hybrid retrieval quality over it."""

import json
from pathlib import Path

import pytest

from rag.models import Collection
from rag.retrieval import retrieve

DATA = Path(__file__).resolve().parent.parent / "data" / "rag"


def questions():
    return [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]


def test_every_question_has_its_answer_in_its_document():
    items = questions()
    assert len(items) >= 60
    for item in items:
        text = " ".join((DATA / "documents" / item["document"]).read_text().split())
        assert item["answer"] in text, item


@pytest.mark.django_db
def test_hybrid_retrieval_finds_the_answer_passage_in_the_top_5(alice, add_and_ingest):
    collection = Collection.objects.create(name="eval", owner=alice)
    for path in sorted((DATA / "documents").glob("*.md")):
        assert add_and_ingest(collection, path.name, path.read_bytes()).status == "ready"
    sample = questions()[::3]  # a third of the set keeps the test quick; the benchmark runs all of it
    hits = 0
    for item in sample:
        found = retrieve(item["question"], alice, top_k=5, threshold=-1)
        hits += any(r.document_title == item["document"] and item["answer"] in " ".join(r.text.split()) for r in found)
    assert hits / len(sample) >= 0.95
