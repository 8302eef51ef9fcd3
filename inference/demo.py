"""Demo data for `r3mes demo` (run by `make run`): queue training of the starter experts once.

The base model serves at once; the four starter adapters train in the Celery worker meanwhile and
become servable as each one is approved. A Redis claim (SET NX with a TTL) keeps a second
`make run` from queueing a second training while one is pending or running.

`make run` seeds before its own Redis starts (Redis runs under the process supervisor), so the
queueing also happens when a Celery worker comes up (`inference.tasks.queue_starters_on_start`):
whichever runs first with Redis up queues, the claim stops the other.
"""

from django.conf import settings

CLAIM_KEY = "r3mes:starter-training"
CLAIM_TTL = 3 * 3600  # a crashed worker's claim expires, so training is retried on a later start


def _redis():
    import redis

    return redis.Redis.from_url(settings.REDIS_URL)


def release_training_claim():
    _redis().delete(CLAIM_KEY)


def queue_starter_training() -> str | None:
    """Queue training of the starters that have no adapter yet, once (see the module docstring).
    Returns what happened, for the caller to print; None when there is nothing to do."""
    from inference.starters import missing_starters

    if not settings.R3MES_STARTER_AUTO_TRAIN:
        return None
    missing = missing_starters()
    if not missing:
        return None
    if not _redis().set(CLAIM_KEY, "queued", nx=True, ex=CLAIM_TTL):
        return f"starter experts ({', '.join(missing)}) are already queued for training"
    from inference.tasks import train_starter_experts

    train_starter_experts.delay()
    return f"queued background training of starter experts: {', '.join(missing)} (servable in a few minutes)"


def seed(out):
    import redis

    try:
        message = queue_starter_training()
    except redis.exceptions.ConnectionError:
        message = "starter experts: training will be queued when the Celery worker starts (Redis is not up yet)"
    if message:
        out.write(message)
