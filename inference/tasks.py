from celery import shared_task

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
