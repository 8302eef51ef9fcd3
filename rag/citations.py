"""Cited answers: how the chat pipeline puts retrieved passages into the prompt as numbered
sources, and which of them an answer actually cites.

Two signals, in this order:

1. **Markers.** The prompt asks for `[n]` after each sentence; valid markers (1..len(sources)) name
   the sources, `"cited": "marker"`.
2. **Attribution**, when the answer carries no valid marker (SmolLM2-135M rarely writes them: see
   benchmarks/RESULTS.md, "Citations"). A source counts as cited when an answer sentence is drawn
   from it: most of the sentence's informative words — its content words that are not already in
   the question — occur in the source, at least two of them, and at least one pair of them occurs
   there side by side (a copied phrase, not a bag of topic words). Each such sentence is credited
   to the one source that supports it best. `"cited": "attributed"`.

Attribution is lexical, not by embedding similarity, on purpose: small models answer from
sources by copying phrases, which word overlap sees exactly; MiniLM similarity between a short
answer sentence and a whole 512-token passage mostly measures the shared topic (an on-topic but
made-up answer scores as high as a copied one), and dropping the question's own words is what
separates "repeats the question" from "uses the source". It is also deterministic on every
machine (no float threshold that flips between CPU and GPU) and costs microseconds, where an
embedding pass would stall the worker's decode loop, which runs `finish` in its scheduler thread.
"""

import re

from .index import bm25_tokens

# The layout SmolLM2-135M used its sources best with, of four measured (benchmarks/RESULTS.md,
# "Citations"): a short instruction with an example in the system prompt, the numbered sources
# right before the question in the user's message.
SOURCES_INSTRUCTION = (
    "Answer from the numbered sources. After each sentence, write the number of the source it comes from "
    "in square brackets, for example: The sky is blue [2]."
)

# Attribution thresholds (see the module docstring; measured in benchmarks/RESULTS.md "Citations").
MIN_COVERAGE = 0.5  # share of a sentence's informative words found in the source
MIN_MATCHED = 2  # informative words found in the source
MIN_PHRASES = 1  # adjacent content-word pairs of the sentence found side by side in the source

_MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def format_sources(results):
    """One numbered line per result, `[n] title (p. N): text`."""
    return "\n".join(
        f"[{number}] {result.document_title} (p. {result.page}): {' '.join(result.text.split())}"
        for number, result in enumerate(results, start=1)
    )


def with_sources(chat, results):
    """The chat messages with the numbered sources put before the question in the last user
    message (the caller adds SOURCES_INSTRUCTION to the system prompt); unchanged without results."""
    if not results:
        return chat
    last = max(i for i, message in enumerate(chat) if message["role"] == "user")
    question = chat[last]["content"]
    return chat[:last] + [{**chat[last], "content": f"{format_sources(results)}\n\nQuestion: {question}"}] + chat[last + 1:]


def sentences(text):
    return [s.strip() for s in _SENTENCE_END.split(text or "") if s.strip()]


def marker_numbers(text, count):
    """The source numbers the text cites as [n] or [n, m], in order of first citation, each once;
    numbers outside 1..count are ignored."""
    cited = []
    for match in _MARKER.finditer(text or ""):
        for number in re.findall(r"\d+", match.group(1)):
            n = int(number)
            if 1 <= n <= count and n not in cited:
                cited.append(n)
    return cited


class SourceText:
    """A source's words, prepared once for scoring every answer sentence against it."""

    def __init__(self, text):
        tokens = bm25_tokens(text)
        self.words = set(tokens)
        self.pairs = set(zip(tokens, tokens[1:]))
        self.sentences = sentences(text)


def support(sentence, source, question_words):
    """(coverage, matched words, matched pairs) of one answer sentence against one source."""
    tokens = bm25_tokens(_MARKER.sub(" ", sentence))
    informative = set(tokens) - question_words
    if not informative:
        return 0.0, 0, 0
    matched = informative & source.words
    pairs = {
        pair for pair in zip(tokens, tokens[1:])
        if pair in source.pairs and (pair[0] in informative or pair[1] in informative)
    }
    return len(matched) / len(informative), len(matched), len(pairs)


def supports(score):
    coverage, matched, pairs = score
    return coverage >= MIN_COVERAGE and matched >= MIN_MATCHED and pairs >= MIN_PHRASES


def attributed_numbers(answer_text, results, question=""):
    """{source number: (best score, answer sentence)} for the sources answer sentences are drawn
    from, in order of the first sentence drawn from each."""
    question_words = set(bm25_tokens(question or ""))
    prepared = [SourceText(result.text) for result in results]
    credited = {}
    for sentence in sentences(answer_text):
        best = None
        for number, source in enumerate(prepared, start=1):
            score = support(sentence, source, question_words)
            if supports(score) and (best is None or score[:2] > best[1][:2]):
                best = (number, score)  # ties go to the higher-ranked source
        if best is not None:
            number, score = best
            if number not in credited or score[:2] > credited[number][0][:2]:
                credited[number] = (score, sentence)
    return credited


def best_quote(source_text, sentence, question_words=frozenset()):
    """The sentence of the source that shares the most informative words with `sentence`."""
    wanted = set(bm25_tokens(_MARKER.sub(" ", sentence))) - question_words
    best, best_overlap = None, 0
    for candidate in sentences(source_text):
        overlap = len(wanted & set(bm25_tokens(candidate)))
        if overlap > best_overlap:
            best, best_overlap = candidate, overlap
    return best


def cited_sources(answer_text, results, question=""):
    """The sources the answer cites: by its valid [n] markers when it has any, otherwise the
    sources its sentences are drawn from. Each source dict carries `cited` ("marker" or
    "attributed") and `quote`, the source sentence that best matches the answer."""
    if not results:
        return []
    question_words = set(bm25_tokens(question or ""))
    numbers = marker_numbers(answer_text, len(results))
    if numbers:
        how = "marker"
        # The answer sentence carrying each marker picks the quote.
        carrying = {}
        for sentence in sentences(answer_text):
            for n in marker_numbers(sentence, len(results)):
                carrying.setdefault(n, sentence)
        evidence = {n: carrying.get(n, answer_text) for n in numbers}
    else:
        how = "attributed"
        credited = attributed_numbers(answer_text, results, question)
        numbers = list(credited)
        evidence = {n: credited[n][1] for n in numbers}
    sources = []
    for n in numbers:
        result = results[n - 1]
        sources.append({
            "n": n, "title": result.document_title, "page": result.page, "snippet": result.snippet,
            "quote": best_quote(result.text, evidence[n], question_words), "url": result.url,
            "document_id": result.document_id, "chunk_id": result.chunk_id, "collection": result.collection,
            "cited": how,
        })
    return sources
