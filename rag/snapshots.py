"""Collection snapshots: one content-addressed file with the passages, vectors and metadata.

The file is a gzip'd tar of `snapshot.json` (collection, documents, chunks) and `vectors.npy`
(float32 [chunks, 384], in the order of snapshot.json's chunks). It is written deterministically
(fixed timestamps), so the same collection gives the same bytes, and named
`<collection>-<sha256 of the file>.r3mes-rag.tgz`; import recomputes the hash and refuses a file
whose bytes do not match its name.
"""

import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.text import slugify

from . import index
from .models import Chunk, Collection, Document

FORMAT = "r3mes-rag-snapshot/1"
SUFFIX = ".r3mes-rag.tgz"
_NAME = re.compile(r"-([0-9a-f]{64})" + re.escape(SUFFIX) + "$")


class SnapshotError(ValueError):
    pass


def _tar_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def export_collection(collection, out_dir):
    """Writes the snapshot into `out_dir`; returns its path."""
    documents = list(collection.documents.filter(status=Document.Status.READY).order_by("id"))
    chunks = list(Chunk.objects.filter(document__in=documents).order_by("document_id", "ordinal"))
    meta = {
        "format": FORMAT,
        "collection": {"name": collection.name, "kind": collection.kind, "visibility": collection.visibility,
                       "news_ttl_days": collection.news_ttl_days, "owner": collection.owner.username},
        "documents": [
            {"key": d.pk, "original_name": d.original_name, "content_type": d.content_type, "size": d.size,
             "sha256": d.sha256, "pages": d.pages, "chunk_count": d.chunk_count, "created": d.created.isoformat(),
             "expires": d.expires.isoformat() if d.expires else None}
            for d in documents
        ],
        "chunks": [
            {"document": c.document_id, "ordinal": c.ordinal, "text": c.text, "page": c.page,
             "char_start": c.char_start, "char_end": c.char_end, "tokens": c.tokens}
            for c in chunks
        ],
    }
    vectors = np.vstack([c.embedding() for c in chunks]) if chunks else np.zeros((0, 384), dtype=np.float32)
    npy = io.BytesIO()
    np.save(npy, vectors.astype(np.float32), allow_pickle=False)

    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        _tar_member(tar, "snapshot.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
        _tar_member(tar, "vectors.npy", npy.getvalue())
    payload = raw.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slugify(collection.name) or 'collection'}-{digest}{SUFFIX}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)
    return path


def read_snapshot(path):
    """(metadata, vectors) of a snapshot file, after checking its bytes against the hash in its name."""
    path = Path(path)
    match = _NAME.search(path.name)
    if match is None:
        raise SnapshotError(f"{path.name} is not a snapshot name (<name>-<sha256>{SUFFIX})")
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"Cannot read {path}: {exc.strerror}") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != match.group(1):
        raise SnapshotError(f"Hash mismatch: the file's SHA-256 is {digest}, its name says {match.group(1)}; it is corrupt or altered")
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            meta = json.loads(tar.extractfile("snapshot.json").read())
            vectors = np.load(io.BytesIO(tar.extractfile("vectors.npy").read()), allow_pickle=False)
    except (tarfile.TarError, KeyError, json.JSONDecodeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"The snapshot is malformed: {exc}") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"Unsupported snapshot format {meta.get('format')!r}; expected {FORMAT}")
    if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != len(meta["chunks"]):
        raise SnapshotError("The snapshot's vectors do not match its chunks")
    return meta, vectors


def import_snapshot(path, owner, name=None):
    """Creates (or adds to) `owner`'s collection from a snapshot; documents already there (same
    sha256) are skipped. Returns (collection, documents added, chunks added)."""
    meta, vectors = read_snapshot(path)
    info = meta["collection"]
    with transaction.atomic():
        collection, _ = Collection.objects.get_or_create(
            owner=owner, name=name or info["name"],
            defaults={"kind": info["kind"], "visibility": Collection.Visibility.PRIVATE if info["visibility"] == "shared" else info["visibility"],
                      "news_ttl_days": info["news_ttl_days"]},
        )
        present = set(collection.documents.values_list("sha256", flat=True))
        now = timezone.now()
        by_key = {}
        for item in meta["documents"]:
            if item["sha256"] in present:
                continue
            expires = parse_datetime(item["expires"]) if item["expires"] else None
            if expires is not None and expires <= now:
                continue  # already expired news is not brought back
            by_key[item["key"]] = Document.objects.create(
                collection=collection, original_name=item["original_name"], content_type=item["content_type"],
                size=item["size"], sha256=item["sha256"], status=Document.Status.READY, progress=100,
                pages=item["pages"], chunk_count=item["chunk_count"], uploaded_by=owner, expires=expires,
            )
        chunks = [
            Chunk(document=by_key[c["document"]], ordinal=c["ordinal"], text=c["text"], page=c["page"],
                  char_start=c["char_start"], char_end=c["char_end"], tokens=c["tokens"], vector=vectors[i].tobytes())
            for i, c in enumerate(meta["chunks"]) if c["document"] in by_key
        ]
        Chunk.objects.bulk_create(chunks, batch_size=1000)
    with index.lock(collection.pk):
        index.rebuild(collection.pk)
    return collection, len(by_key), len(chunks)
