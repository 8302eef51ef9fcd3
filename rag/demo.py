"""A public "general" collection with two short documents about R3MES, ingested on the spot."""

from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction

from governance.models import User

from . import actions
from .models import Collection, Document

COLLECTION = "R3MES handbook"

DOCUMENTS = {
    "how-r3mes-works.md": """# How R3MES works

R3MES is a community-run AI service. A small frozen backbone model answers every request, and
expert adapters trained with DoRA specialise it for coding, medicine, law and other fields. A router
reads each request and mixes the experts that fit it, so one prompt can draw on two experts at once.

## Documents and retrieval

Members upload their own documents into collections. Each document is cut into passages of about
512 tokens, embedded with the MiniLM sentence model, and indexed twice: in a FAISS vector index for
meaning and in a BM25 index for exact words. A question searches both and fuses the two rankings
with reciprocal rank fusion, and the answer cites the passages it used as numbered sources.
""",
    "governance-and-mining.md": """# Governance and mining

Stake gives voting power. Proposals approve a new adapter version, a training dataset or a backbone
upgrade. A proposal first collects a deposit, then opens a voting period in which members vote Yes,
No, Abstain or No with veto. A proposal passes when the quorum of one third of the staked power has
voted, vetoes stay below one third, and more than half of the non-abstaining votes say Yes.

Miners train adapter updates on shards of an approved dataset during a mining round. The round
aggregates the submissions robustly, with a trimmed mean or a coordinate median, so a few bad
updates cannot poison the result, and records the outcome on a signed ledger.
""",
}


def seed(out):
    admin = User.objects.filter(username="admin").first()
    if admin is None:
        out.write("RAG demo skipped: run the governance demo first (it creates the admin user)")
        return
    with transaction.atomic():
        collection, _ = Collection.objects.get_or_create(
            owner=admin, name=COLLECTION,
            defaults={"kind": Collection.Kind.GENERAL, "visibility": Collection.Visibility.PUBLIC},
        )
    for name, text in DOCUMENTS.items():
        document, created = actions.add_document(collection, admin, SimpleUploadedFile(name, text.encode()), enqueue=False)
        if document.status == Document.Status.QUEUED:
            # Ingested here rather than waiting for a worker, so the demo answers at once.
            actions.ingest(document.pk)
    ready = collection.documents.filter(status=Document.Status.READY).count()
    out.write(f"Demo documents: public collection “{COLLECTION}” with {ready} ready documents")
