"""Starter experts: committed datasets, training into approved adapters, queued once by `r3mes demo`."""

import io
import json

import pytest
import redis
from django.conf import settings

from inference import demo
from inference.adapter_cache import file_sha256
from inference.models import Adapter
from inference.starters import DATA_DIR, STARTERS, load_examples, missing_starters, train_starters
from tests.inference.helpers import serving_engine  # noqa: F401


@pytest.mark.parametrize("expert", STARTERS)
def test_starter_datasets_are_instruction_examples(expert):
    examples = load_examples(expert)
    assert 40 <= len(examples) <= 80
    assert all(ex["instruction"].strip() and ex["response"].strip() for ex in examples)
    assert len({ex["instruction"] + ex.get("input", "") for ex in examples}) == len(examples)


def test_train_starters_registers_an_approved_adapter_once(db, serving_engine):  # noqa: F811
    trained = train_starters(["general"], steps=1, engine=serving_engine)
    assert [a.expert for a in trained] == ["general"]
    adapter = Adapter.servable()["general"]
    assert adapter.version == 1 and adapter.status == Adapter.Status.APPROVED
    assert adapter.sha256 == file_sha256(f"{adapter.path}/adapter_model.safetensors")
    assert adapter.path.startswith(str(settings.ADAPTER_DIR)) and adapter.metrics["steps"] == 1
    assert "general" not in missing_starters()
    assert train_starters(["general"], steps=1, engine=serving_engine) == []  # idempotent
    assert "train-general" not in serving_engine.adapters


def test_train_starters_rejects_experts_without_data(db):
    with pytest.raises(ValueError, match="no starter data"):
        train_starters(["legal"])


def test_demo_queues_starter_training_only_once(db, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.R3MES_STARTER_AUTO_TRAIN = True
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(demo.CLAIM_KEY, "celery")
    try:
        out = io.StringIO()
        demo.seed(out)
        demo.seed(out)
        queued = [json.loads(m)["headers"]["task"] for m in client.lrange("celery", 0, -1)]
        assert queued == ["inference.tasks.train_starter_experts"]
        assert "already queued" in out.getvalue()
    finally:
        client.delete(demo.CLAIM_KEY, "celery")


def test_demo_queues_nothing_when_starters_exist(db, settings):
    settings.R3MES_STARTER_AUTO_TRAIN = True
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(demo.CLAIM_KEY, "celery")
    for expert in STARTERS:
        Adapter.objects.create(expert=expert, version=1, sha256="0" * 64, status=Adapter.Status.APPROVED)
    demo.seed(io.StringIO())
    assert client.llen("celery") == 0


def test_starter_data_files_are_committed():
    assert sorted(p.stem for p in DATA_DIR.glob("*.jsonl")) == sorted(STARTERS)


def test_demo_before_redis_is_up_defers_training_to_the_worker_start(db, settings):
    """`make run` seeds before its Redis starts: seeding must not fail, and a starting Celery
    worker (the worker_ready signal, sent here as Celery sends it) queues the training once."""
    from celery.signals import worker_ready

    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.R3MES_STARTER_AUTO_TRAIN = True
    real_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    out = io.StringIO()
    demo.seed(out)
    assert "when the Celery worker starts" in out.getvalue()
    settings.REDIS_URL = real_url
    client = redis.Redis.from_url(real_url)
    client.delete(demo.CLAIM_KEY, "celery")
    try:
        worker_ready.send(sender=None)
        worker_ready.send(sender=None)
        queued = [json.loads(m)["headers"]["task"] for m in client.lrange("celery", 0, -1)]
        assert queued == ["inference.tasks.train_starter_experts"]
    finally:
        client.delete(demo.CLAIM_KEY, "celery")
