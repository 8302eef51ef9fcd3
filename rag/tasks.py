from celery import shared_task

from . import actions


@shared_task(name="rag.tasks.ingest_document")
def ingest_document(document_id):
    return actions.ingest(document_id)


@shared_task(name="rag.tasks.purge_expired_documents")
def purge_expired_documents():
    return actions.purge_expired()


@shared_task(name="rag.tasks.recover_stale_documents")
def recover_stale_documents():
    requeued, failed = actions.recover_stale()
    return {"requeued": requeued, "failed": failed}
