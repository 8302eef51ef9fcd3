import re

import pytest

from rag.chunking import SPECIAL_TOKENS, chunk_pages, split_words
from rag.embedding import get_tokenizer

LOREM = (
    "Photosynthesis converts light energy into chemical energy. Chlorophyll absorbs mostly blue and red light. "
    "The Calvin cycle fixes carbon dioxide into sugars, using ATP and NADPH made by the light reactions. "
    "Extraordinarily-long-hyphenated-compound-words and supercalifragilisticexpialidocious stay whole. "
)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def test_chunks_never_split_a_word_and_fit_the_token_budget(tokenizer):
    text = LOREM * 40
    spans = chunk_pages([text], tokenizer, chunk_tokens=64, overlap=10)
    assert len(spans) > 10
    words = set(text.split())
    for span in spans:
        assert span.text == text[span.start : span.end]
        assert span.text.split()[0] in words and span.text.split()[-1] in words  # whole words at both ends
        assert span.start == 0 or text[span.start - 1].isspace()
        assert span.end == len(text) or text[span.end].isspace()
        real = len(tokenizer(span.text, add_special_tokens=True)["input_ids"])
        assert real == span.tokens + SPECIAL_TOKENS <= 64


def test_consecutive_chunks_overlap_by_at_most_the_overlap_setting(tokenizer):
    text = LOREM * 40
    spans = chunk_pages([text], tokenizer, chunk_tokens=64, overlap=10)
    for previous, current in zip(spans, spans[1:]):
        assert current.start < previous.end  # they do overlap
        shared = text[current.start : previous.end]
        assert 0 < len(tokenizer(shared, add_special_tokens=False)["input_ids"]) <= 10
        assert current.start > previous.start  # and always move forward


def test_chunks_end_at_sentence_boundaries_when_one_is_in_reach(tokenizer):
    spans = chunk_pages([LOREM * 20], tokenizer, chunk_tokens=100, overlap=0)
    for span in spans[:-1]:
        assert re.search(r"[.!?]$", span.text), span.text[-40:]


def test_default_size_is_512_tokens_with_50_overlap_and_pages_are_kept(tokenizer, settings):
    assert (settings.R3MES_RAG_CHUNK_TOKENS, settings.R3MES_RAG_CHUNK_OVERLAP) == (512, 50)
    pages = [LOREM * 30, "Short second page."]
    spans = chunk_pages(pages, tokenizer)
    assert {s.page for s in spans} == {1, 2}
    assert max(s.tokens for s in spans) <= 510 and max(s.tokens for s in spans) > 400
    last = spans[-1]
    assert last.text == "Short second page." and last.start == len(pages[0]) + 2  # offsets in the joined text


def test_a_word_longer_than_the_budget_forms_its_own_chunk():
    counts = [3, 40, 3, 3]  # word 1 alone exceeds a budget of 10
    ranges = split_words(counts, [False] * 4, budget=10, overlap=2)
    assert ranges[0] == (0, 1) and (1, 2) in ranges and ranges[-1][1] == 4
