"""Celery tasks: take ids, call mining.actions, report. Each action guards itself against double
processing (conditional status updates, the unique (round, shard, miner) constraint)."""

from celery import shared_task

from . import actions
from .chain_tasks import *  # noqa: F401,F403  (Celery autodiscovery imports only tasks.py)


@shared_task(acks_late=True)
def prepare_round(round_id):
    return actions.do_prepare_round(round_id)


@shared_task(acks_late=True)
def train_shard(round_id, shard):
    submission = actions.do_train_shard(round_id, shard)
    return submission.pk if submission else None


@shared_task(acks_late=True)
def aggregate_round(round_id):
    adapter = actions.do_aggregate_round(round_id)
    return adapter.pk if adapter else None


@shared_task
def expire_stuck_rounds():
    return actions.do_expire_stuck_rounds()
