"""Demo data for `r3mes demo` (run by `make run`): queue training of the starter experts once.

The base model serves at once; the four starter adapters train in the Celery worker meanwhile and
become servable as each one is approved. A Redis claim (SET NX with a TTL) keeps a second
`make run` from queueing a second training while one is pending or running.
"""

from django.conf import settings

CLAIM_KEY = "r3mes:starter-training"
CLAIM_TTL = 3 * 3600  # a crashed worker's claim expires, so training is retried on a later start


def _redis():
    import redis

    return redis.Redis.from_url(settings.REDIS_URL)


def release_training_claim():
    _redis().delete(CLAIM_KEY)


def seed(out):
    from inference.starters import missing_starters

    if not settings.R3MES_STARTER_AUTO_TRAIN:
        return
    missing = missing_starters()
    if not missing:
        return
    if not _redis().set(CLAIM_KEY, "queued", nx=True, ex=CLAIM_TTL):
        out.write(f"starter experts ({', '.join(missing)}) are already queued for training")
        return
    from inference.tasks import train_starter_experts

    train_starter_experts.delay()
    out.write(f"queued background training of starter experts: {', '.join(missing)} (servable in a few minutes)")
