"""RAG benchmark: ingestion throughput, retrieval latency by index size, retrieval quality.

Runs side by side, in one process run, on a throw-away data dir and SQLite database:
  ingest   — `rag.actions.ingest` end to end (extract, chunk, embed, index, store) on a long
             document made of the evaluation texts, at 512- and 256-token chunks; embedding alone
             for comparison (ratio = how much of the time is the model).
  latency  — `rag.retrieval.retrieve` (hybrid, including the query embedding) at 1k, 10k and 100k
             chunks, and the index searches alone. The chunks of this part are SYNTHETIC: random
             unit vectors and random 40-word texts drawn from the evaluation vocabulary (embedding
             100k real chunks would take hours on 2 cores). Above R3MES_RAG_HNSW_THRESHOLD (50k)
             the index is HNSW; 100k is also measured exact (flat) for the ratio.
  quality  — 76 questions over 12 documents written for this (tests/data/rag/): hit@5 and MRR@10
             for dense-only, BM25-only and hybrid (RRF). A hit is a retrieved passage from the
             right document that contains the answer phrase.
  citations — the real model (SmolLM2-135M, greedy) answers --citation-questions of those
             questions from their top 3 passages under each prompt layout in LAYOUTS: how many
             answers carry valid [n] markers, contain the expected phrase, cite (marker or
             attribution) any source and the answer's document; then the attribution thresholds
             swept over all those answers and three unrelated ones. Not in the default parts
             (minutes of generation on CPU).

    python benchmarks/rag.py [--sizes 1000,10000,100000] [--queries 40] [--parts ingest,quality,latency,citations]
                             [--layouts user+example] [--repetition-penalties 1.0,1.1]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "rag"
sys.path.insert(0, str(REPO))


def setup_django(data_dir):
    os.environ["R3MES_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r3mes_site.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("R3MES_TORCH_THREADS", "2")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def load_questions():
    return [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]


def documents():
    return {path.name: path.read_bytes() for path in sorted((DATA / "documents").glob("*.md"))}


def p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_ingest(user, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from rag import actions, embedding
    from rag.models import Collection

    text = b"\n\n".join(documents().values()) * 8
    rows = []
    for chunk_tokens, overlap in ((512, 50), (256, 25)):
        settings.R3MES_RAG_CHUNK_TOKENS, settings.R3MES_RAG_CHUNK_OVERLAP = chunk_tokens, overlap
        collection = Collection.objects.create(name=f"ingest-{chunk_tokens}", owner=user)
        document, _ = actions.add_document(collection, user, SimpleUploadedFile("long.md", text), enqueue=False)
        start = time.perf_counter()
        outcome = actions.ingest(document.pk)
        seconds = time.perf_counter() - start
        document.refresh_from_db()
        assert outcome == "ready", document.error
        texts = list(document.chunks.order_by("ordinal").values_list("text", flat=True))
        start = time.perf_counter()
        embedding.embed(texts)
        embed_seconds = time.perf_counter() - start
        rows.append((chunk_tokens, overlap, document.chunk_count, seconds, embed_seconds))
    settings.R3MES_RAG_CHUNK_TOKENS, settings.R3MES_RAG_CHUNK_OVERLAP = 512, 50
    return rows


def bench_quality(user, settings, questions):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from rag import actions
    from rag.models import Collection
    from rag.retrieval import retrieve

    results = {}
    for chunk_tokens, overlap in ((512, 50), (128, 16)):
        settings.R3MES_RAG_CHUNK_TOKENS, settings.R3MES_RAG_CHUNK_OVERLAP = chunk_tokens, overlap
        collection = Collection.objects.create(name=f"quality-{chunk_tokens}", owner=user)
        for name, data in documents().items():
            document, _ = actions.add_document(collection, user, SimpleUploadedFile(name, data), enqueue=False)
            assert actions.ingest(document.pk) == "ready"
        chunks = sum(collection.documents.values_list("chunk_count", flat=True))
        for mode in ("dense", "bm25", "hybrid"):
            hits = hits1 = 0
            reciprocal = 0.0
            for q in questions:
                answer = " ".join(q["answer"].split())
                found = retrieve(q["question"], user, collections=[collection.pk], top_k=10, threshold=-1, mode=mode)
                rank = next((i for i, r in enumerate(found, start=1)
                             if r.document_title == q["document"] and answer in " ".join(r.text.split())), None)
                if rank is not None:
                    reciprocal += 1 / rank
                    hits += rank <= 5
                    hits1 += rank == 1
            n = len(questions)
            results[(chunk_tokens, mode)] = (chunks, hits1 / n, hits / n, reciprocal / n)
    settings.R3MES_RAG_CHUNK_TOKENS, settings.R3MES_RAG_CHUNK_OVERLAP = 512, 50
    return results


def synthetic_collection(user, size, vocabulary, rng):
    import numpy as np

    from rag.models import Chunk, Collection, Document

    collection = Collection.objects.create(name=f"synthetic-{size}", owner=user)
    document = Document.objects.create(collection=collection, original_name=f"synthetic-{size}.txt",
                                       content_type="text/plain", size=0, sha256=f"{size:064x}",
                                       status=Document.Status.READY, progress=100, uploaded_by=user)
    batch = 5000
    for start in range(0, size, batch):
        n = min(batch, size - start)
        vectors = rng.standard_normal((n, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        words = rng.choice(vocabulary, size=(n, 40))
        Chunk.objects.bulk_create(
            [Chunk(document=document, ordinal=start + i, text=" ".join(words[i]), page=1, char_start=0, char_end=0,
                   vector=vectors[i].tobytes()) for i in range(n)],
            batch_size=1000,
        )
    return collection


def time_queries(function, queries):
    times = []
    for query in queries:
        start = time.perf_counter()
        function(query)
        times.append(time.perf_counter() - start)
    return times


def bench_latency(user, settings, sizes, questions, n_queries):
    import re

    import numpy as np

    from rag import embedding, index
    from rag.retrieval import retrieve

    def embed_uncached(query):
        return embedding.embed([query])[0]

    rng = np.random.default_rng(0)
    vocabulary = sorted({w for text in documents().values() for w in re.findall(r"[a-z]{3,}", text.decode().lower())})
    queries = [q["question"] for q in questions][:n_queries]
    for query in queries[:3]:
        retrieve(query, user, top_k=5)  # warm the model
    embed_times = time_queries(embed_uncached, queries)
    rows = []
    for size in sizes:
        start = time.perf_counter()
        collection = synthetic_collection(user, size, vocabulary, rng)
        insert_seconds = time.perf_counter() - start
        variants = [("auto", settings.R3MES_RAG_HNSW_THRESHOLD)]
        if size > settings.R3MES_RAG_HNSW_THRESHOLD:
            variants.append(("flat", size + 1))
        for label, threshold in variants:
            settings.R3MES_RAG_HNSW_THRESHOLD = threshold
            start = time.perf_counter()
            with index.lock(collection.pk):
                loaded = index.rebuild(collection.pk)
            build_seconds = time.perf_counter() - start
            qvecs = {q: embed_uncached(q) for q in queries}
            dense = time_queries(lambda q: loaded.dense_search(qvecs[q], 50), queries)
            bm25 = time_queries(lambda q: loaded.bm25_search(q, 50), queries)
            embedding._cached_query.cache_clear()  # every query embedded once, as a new question is
            full = time_queries(lambda q: retrieve(q, user, collections=[collection.pk], top_k=5), queries)
            # The same questions again: their embeddings come from the per-process LRU cache.
            repeated = time_queries(lambda q: retrieve(q, user, collections=[collection.pk], top_k=5), queries)
            # The same call with the query already embedded: index searches, database, fusion.
            no_embed = time_queries(lambda q: retrieve(q, user, collections=[collection.pk], top_k=5, query_vector=qvecs[q]), queries)
            rows.append((size, loaded.kind, insert_seconds, build_seconds, dense, bm25, no_embed, full, repeated))
            settings.R3MES_RAG_HNSW_THRESHOLD = 50000
    return embed_times, rows


def _numbered(results):
    from rag.citations import format_sources

    return format_sources(results)


def _system_layout(question, results):  # the layout before this comparison
    return [{"role": "system", "content": "Answer the question using the numbered sources below. After each sentence "
             "that uses a source, cite it as [n] with its number. If the sources do not contain the answer, say "
             "that you do not know.\n\n" + _numbered(results)},
            {"role": "user", "content": question}]


def _pipeline_layout(question, results):  # what inference.pipeline builds
    from rag.citations import SOURCES_INSTRUCTION, with_sources

    return [{"role": "system", "content": SOURCES_INSTRUCTION}] + with_sources([{"role": "user", "content": question}], results)


def _copy_layout(question, results):
    return [{"role": "system", "content": "Answer the user's question with the sentence from the numbered sources "
             "that answers it, copied word for word, followed by the source number in square brackets, for "
             "example: The sky is blue [2]. If no source answers the question, say that you do not know."},
            {"role": "user", "content": f"{_numbered(results)}\n\nQuestion: {question}"}]


# Prompt layouts compared by the citations part: (question, results) -> chat messages.
LAYOUTS = {"system": _system_layout, "user+example": _pipeline_layout, "user+copy": _copy_layout}
UNRELATED = ["I am sorry, I cannot help with that request.", "The capital of France is Paris, a city on the Seine.",
             "Python is a programming language that is easy to learn and widely used."]


def bench_citations(user, questions, n_questions, layouts, penalties=(1.0,)):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from django.conf import settings

    from inference.engine import Engine
    from rag import actions, citations
    from rag.models import Collection
    from rag.retrieval import retrieve

    collection = Collection.objects.create(name="citations", owner=user)
    for name, data in documents().items():
        document, _ = actions.add_document(collection, user, SimpleUploadedFile(name, data), enqueue=False)
        assert actions.ingest(document.pk) == "ready"
    engine = Engine.load(cache_dir=settings.MODEL_CACHE_DIR)
    asked = questions[1::max(1, len(questions) // n_questions)]
    answers, table = [], {}
    for layout, penalty in ((layout, penalty) for layout in layouts for penalty in penalties):
        row = dict(answers=0, markers=0, phrase=0, cited=0, right=0)
        for q in asked:
            results = retrieve(q["question"], user, collections=[collection.pk], top_k=3)
            text = "".join(engine.generate(LAYOUTS[layout](q["question"], results), max_tokens=80, temperature=0.0,
                                           repetition_penalty=penalty))
            cited = citations.cited_sources(text, results, q["question"])
            row["answers"] += 1
            row["markers"] += any(s["cited"] == "marker" for s in cited)
            row["phrase"] += " ".join(q["answer"].lower().split()) in " ".join(text.lower().split())
            row["cited"] += bool(cited)
            row["right"] += any(s["title"] == q["document"] for s in cited)
            answers.append((q, results, text))
        table[layout if len(penalties) == 1 else f"{layout}, repetition penalty {penalty}"] = row
    sweep = {}
    saved = citations.MIN_COVERAGE, citations.MIN_PHRASES
    for coverage in (0.34, 0.5, 0.67):
        for pairs in (0, 1):
            citations.MIN_COVERAGE, citations.MIN_PHRASES = coverage, pairs
            counts = dict(attributed=0, right=0, other=0, unrelated=0)
            for q, results, text in answers:
                cited = [s for s in citations.cited_sources(text, results, q["question"]) if s["cited"] == "attributed"]
                counts["attributed"] += bool(cited)
                counts["right"] += any(s["title"] == q["document"] for s in cited)
                counts["other"] += any(s["title"] != q["document"] for s in cited)
                counts["unrelated"] += sum(bool(citations.cited_sources(u, results, q["question"])) for u in UNRELATED)
            sweep[(coverage, pairs)] = counts
    citations.MIN_COVERAGE, citations.MIN_PHRASES = saved
    return table, sweep, len(answers)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--parts", default="ingest,quality,latency", help="comma-separated subset to run")
    parser.add_argument("--citation-questions", type=int, default=12)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="prompt layouts for the citations part")
    parser.add_argument("--repetition-penalties", default="1.0",
                        help="comma-separated repetition penalties the citations part answers with (each a row)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    parts = set(args.parts.split(","))

    with tempfile.TemporaryDirectory(prefix="r3mes-rag-bench-") as tmp:
        setup_django(tmp)
        import torch
        from django.conf import settings

        from governance.models import User

        torch.set_num_threads(2)
        user = User.objects.create_user("bench", password="bench-password-123")
        questions = load_questions()
        ms = lambda seconds: f"{1000 * seconds:.1f}"  # noqa: E731

        print(f"# RAG benchmark — {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}\n")
        if "ingest" in parts:
            print("## Ingestion (end to end: extract, chunk, embed, index, store)\n")
            print("| chunk tokens / overlap | chunks | seconds | chunks/s | embedding alone chunks/s | embedding share |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for chunk_tokens, overlap, chunks, seconds, embed_seconds in bench_ingest(user, settings):
                print(f"| {chunk_tokens} / {overlap} | {chunks} | {seconds:.1f} | {chunks / seconds:.1f} | "
                      f"{chunks / embed_seconds:.1f} | {embed_seconds / seconds:.2f} |")

        if "quality" in parts:
            print(f"\n## Retrieval quality ({len(questions)} questions, 12 documents)\n")
            print("| chunking | passages | mode | hit@1 | hit@5 | MRR@10 |")
            print("| --- | ---: | --- | ---: | ---: | ---: |")
            for (chunk_tokens, mode), (chunks, hit1, hit5, mrr) in bench_quality(user, settings, questions).items():
                print(f"| {chunk_tokens} tokens | {chunks} | {mode} | {hit1:.3f} | {hit5:.3f} | {mrr:.3f} |")

        if "citations" in parts:
            layouts = args.layouts.split(",")
            penalties = [float(p) for p in args.repetition_penalties.split(",") if p]
            table, sweep, n_answers = bench_citations(user, questions, args.citation_questions, layouts, penalties)
            print("\n## Citations (SmolLM2-135M, greedy, 80 tokens, top 3 passages)\n")
            print("| layout | answers | valid [n] markers | expected phrase in the answer | cites a source | cites the answer's document |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for layout, row in table.items():
                print(f"| {layout} | {row['answers']} | {row['markers']} | {row['phrase']} | {row['cited']} | {row['right']} |")
            print(f"\nAttribution thresholds over those {n_answers} answers, and {len(UNRELATED)} unrelated answers per question:\n")
            print("| coverage >= | adjacent pairs >= | answers attributed | to the answer's document | to another document | unrelated attributed |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: |")
            for (coverage, pairs), c in sweep.items():
                print(f"| {coverage} | {pairs} | {c['attributed']} | {c['right']} | {c['other']} | "
                      f"{c['unrelated']} of {len(UNRELATED) * n_answers} |")

        if "latency" not in parts:
            return
        print(f"\n## Retrieval latency ({args.queries} queries, synthetic chunks, top_k 5, 50 candidates per list)\n")
        embed_times, rows = bench_latency(user, settings, sizes, questions, args.queries)
        print(f"Query embedding alone: p50 {ms(statistics.median(embed_times))} ms, p95 {ms(p(embed_times, .95))} ms\n")
        print("| chunks | index | build s | dense p50 ms | BM25 p50 ms | retrieve() without embedding p50 / p95 ms "
              "| vs 1k | retrieve() new question p50 / p95 ms | retrieve() repeated question p50 / p95 ms |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        base = None
        for size, kind, _insert, build, dense, bm25, no_embed, full, repeated in rows:
            base = base or statistics.median(no_embed)
            print(f"| {size} | {kind} | {build:.1f} | {ms(statistics.median(dense))} | {ms(statistics.median(bm25))} | "
                  f"{ms(statistics.median(no_embed))} / {ms(p(no_embed, .95))} | {statistics.median(no_embed) / base:.2f} | "
                  f"{ms(statistics.median(full))} / {ms(p(full, .95))} | "
                  f"{ms(statistics.median(repeated))} / {ms(p(repeated, .95))} |")


if __name__ == "__main__":
    main()
