"""Cutting extracted text into passages measured in tokens of the embedding tokenizer.

A chunk is a run of whole words (whitespace-separated), so a word is never split; it ends at a
sentence end when one falls in its second half, else at the last word that fits. Consecutive
chunks share up to `overlap` tokens of whole words. Pages are chunked separately so every chunk
has one page number to cite.
"""

import re
from dataclasses import dataclass
from itertools import accumulate

PAGE_SEPARATOR = "\n\n"  # between pages in the document's full text (what char offsets refer to)
SPECIAL_TOKENS = 2  # [CLS] and [SEP], added by the embedding model to every chunk

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?…:;][\"'”’)\]]*$")


@dataclass
class ChunkSpan:
    ordinal: int
    page: int
    start: int  # offsets into the full text (pages joined by PAGE_SEPARATOR)
    end: int
    tokens: int
    text: str


def word_token_counts(text, words, tokenizer):
    """Tokens per word, from one tokenizer pass with offsets (WordPiece never merges across
    whitespace, so the counts add up to the text's token count)."""
    counts = [0] * len(words)
    if not words:
        return counts
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    starts = [start for start, _ in words]
    w = 0
    for tok_start, tok_end in offsets:
        if tok_end <= tok_start:
            continue
        while w + 1 < len(words) and starts[w + 1] <= tok_start:
            w += 1
        counts[w] += 1
    return counts


def split_words(counts, sentence_end, budget, overlap):
    """[(first_word, end_word)) ranges over the words: the chunking rule in the module docstring."""
    n = len(counts)
    prefix = [0, *accumulate(counts)]
    ranges = []
    i = 0
    while i < n:
        j = i + 1  # a word longer than the budget still forms a chunk on its own
        while j < n and prefix[j + 1] - prefix[i] <= budget:
            j += 1
        cut = j
        if j < n:
            for k in range(j - 1, i, -1):
                if sentence_end[k] and prefix[k + 1] - prefix[i] >= budget // 2:
                    cut = k + 1
                    break
        ranges.append((i, cut))
        if cut >= n:
            break
        start = cut
        while start - 1 > i and prefix[cut] - prefix[start - 1] <= overlap:
            start -= 1
        i = start
    return ranges


def chunk_pages(pages, tokenizer, chunk_tokens=512, overlap=50):
    budget = chunk_tokens - SPECIAL_TOKENS
    spans = []
    base = 0
    for page_number, text in enumerate(pages, start=1):
        words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        counts = word_token_counts(text, words, tokenizer)
        sentence_end = [
            bool(_SENTENCE_END.search(text[s:e])) or text[e : e + 2] == "\n\n" for s, e in words
        ]
        for first, last in split_words(counts, sentence_end, budget, overlap):
            start, end = words[first][0], words[last - 1][1]
            spans.append(ChunkSpan(len(spans), page_number, base + start, base + end,
                                   sum(counts[first:last]), text[start:end]))
        base += len(text) + len(PAGE_SEPARATOR)
    return spans


def full_text(pages):
    return PAGE_SEPARATOR.join(pages)
