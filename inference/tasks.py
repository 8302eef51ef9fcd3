from celery import shared_task
from celery.signals import worker_ready

from r3mes_site import metrics


@shared_task(name="inference.tasks.train_starter_experts", acks_late=True)
def train_starter_experts():
    """Train the starter experts that still have no adapter (idempotent: trained ones are skipped)."""
    from inference import demo
    from inference.starters import train_starters

    try:
        adapters = train_starters()
    except Exception:
        metrics.jobs.labels(job="train_starter_experts", outcome="failed").inc()
        raise
    finally:
        demo.release_training_claim()
    metrics.jobs.labels(job="train_starter_experts", outcome="ok").inc()
    return [f"{a.expert} v{a.version}" for a in adapters]


@worker_ready.connect
def queue_starters_on_start(sender=None, **kwargs):
    """`make run` seeds its demo before Redis is up: the worker queues the starter training then."""
    import logging

    from inference import demo

    try:
        message = demo.queue_starter_training()
    except Exception:  # a worker must start even when this cannot run (e.g. database not migrated)
        logging.getLogger(__name__).exception("could not queue the starter training")
        return
    if message:
        logging.getLogger(__name__).info(message)
