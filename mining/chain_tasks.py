"""Celery tasks for the ledger side of mining: thin wrappers that take ids and call domain code."""

import logging

from celery import shared_task

from r3mes_site import metrics

log = logging.getLogger(__name__)


@shared_task(name="mining.sync_chain")
def sync_chain():
    """Beat task (CELERY_BEAT_SCHEDULE['mining-chain-sync']): pull every enabled peer."""
    from .chain_sync import sync_all

    results = sync_all()
    for result in results:
        metrics.jobs.labels("chain_sync", "error" if result.error and not result.skipped else "ok").inc()
    return [result.summary() for result in results]


@shared_task(name="mining.sync_peer")
def sync_peer(peer_id):
    from .chain_sync import sync_peer as sync
    from .models import Peer

    peer = Peer.objects.filter(pk=peer_id).first()
    if peer is None:
        return f"peer {peer_id} no longer exists"
    return sync(peer).summary()


@shared_task(name="mining.fetch_model_version")
def fetch_model_version(version_id):
    from .model_versions import FetchError, fetch
    from .models import ModelVersion

    version = ModelVersion.objects.filter(pk=version_id).first()
    if version is None:
        return f"model version {version_id} no longer exists"
    try:
        path = fetch(version)
    except FetchError as exc:
        metrics.jobs.labels("model_fetch", "error").inc()
        log.warning("fetching backbone %s failed: %s", version.name, exc)
        return str(exc)
    metrics.jobs.labels("model_fetch", "ok").inc()
    return str(path)
