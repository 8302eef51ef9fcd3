"""A full round on Celery with the real engine (SmolLM2-135M, a few DoRA steps on CPU).

Celery runs in eager mode (`task_always_eager`): `.delay()` executes the real task functions
in-process, in the order a worker would, with the real database (transactional test, so
`transaction.on_commit` dispatches fire), Redis and blob store. Nothing is mocked.
"""

import hashlib
import json
import tempfile
from decimal import Decimal

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from inference.engine import dora
from inference.models import Adapter
from mining import actions, blobstore, training
from mining.merkle import merkle_root
from mining.models import MinerScore, Round, Submission
from r3mes_site.celery import app as celery_app

torch.set_num_threads(2)

FACTS = [("What colour is the sky?", "The sky is blue."), ("What is two plus two?", "Two plus two is four."),
         ("Name a fruit.", "An apple is a fruit."), ("What do bees make?", "Bees make honey."),
         ("What is ice?", "Ice is frozen water."), ("How many legs has a cat?", "A cat has four legs."),
         ("What is the opposite of hot?", "Cold is the opposite of hot."), ("Where do fish live?", "Fish live in water."),
         ("What colour is grass?", "Grass is green."), ("What is the sun?", "The sun is a star."),
         ("What do cows drink?", "Cows drink water."), ("What is snow?", "Snow is frozen rain.")]
DATA = b"\n".join(json.dumps({"instruction": q, "response": a}).encode() for q, a in FACTS)
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def eager_celery():
    before = (celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates)
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    yield
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = before


def poisoned_adapter(rank, alpha):
    """A right-shaped adapter whose update is huge (scaled ×50 random B): what a poisoner sends."""
    engine = training.get_engine()
    engine.new_adapter("poison", rank, alpha, TARGETS, seed=99)
    gen = torch.Generator().manual_seed(5)
    for layer in dora.dora_modules(engine.model).values():
        if "poison" in layer.lora_B:
            layer.lora_B["poison"].data = torch.randn(layer.lora_B["poison"].shape, generator=gen) * 0.5
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_adapter("poison", tmp)
        engine.unload_adapter("poison")
        return training.pack_dir(tmp)


# Real training on a shared 2-core VM: minutes under load, so more than the default 600 s budget.
@pytest.mark.timeout(1800)
@pytest.mark.django_db(transaction=True)
def test_a_round_trains_every_shard_rejects_the_poisoner_and_yields_a_candidate_adapter(
        eager_celery, settings, alice, api_client):
    settings.MINING_MAX_EVAL_EXAMPLES = 3
    dataset = actions.do_upload_dataset(alice, name="facts", expert="general", fmt="jsonl", data=DATA)
    dataset.approve()
    round_obj = actions.do_open_round(alice, dataset, shards=2, rank=4, alpha=8.0, lr=5e-3, steps=2, batch_size=2,
                                      seed=1, target_modules=TARGETS, method="median", eval_fraction=0.2)

    # An external miner submits a poisoned update for shard 0 while the round is open.
    poison = poisoned_adapter(4, 8.0)
    response = api_client.post(f"/api/mining/rounds/{round_obj.pk}/submissions", {
        "file": SimpleUploadedFile("poison.safetensors", poison),
        "metadata": json.dumps({"shard": 0, "sha256": hashlib.sha256(poison).hexdigest(), "examples": 3})})
    assert response.status_code == 201, response.content

    actions.do_start_round(round_obj)  # eager: prepare → 2 shard trainings → aggregation

    round_obj.refresh_from_db()
    assert round_obj.status == Round.Status.DONE, round_obj.error
    assert round_obj.baseline_eval_loss is not None and round_obj.base_cid
    local = list(Submission.objects.filter(round=round_obj, miner_key="node:local").order_by("shard"))
    assert [s.shard for s in local] == [0, 1]
    for sub in local:
        assert sub.status == "accepted", (sub.reason, round_obj.report)
        assert len(sub.train_losses) == 2 and sub.eval_loss is not None
        assert blobstore.sha256_hex_from_cid(sub.blob_cid) == sub.sha256
        state, config = training.unpack(blobstore.read_bytes(sub.blob_cid))
        assert config["use_dora"] and config["r"] == 4
        assert any(k.endswith("lora_magnitude_vector") for k in state)
    bad = Submission.objects.get(round=round_obj, miner_key=f"user:{alice.pk}")
    assert bad.status == "rejected" and "update norm" in bad.reason and bad.eval_loss is not None
    assert bad.eval_loss > min(s.eval_loss for s in local)

    assert round_obj.merkle_root == merkle_root(sorted(s.blob_cid for s in local))
    adapter = round_obj.result
    assert adapter.status == Adapter.Status.CANDIDATE and adapter.expert == "general" and adapter.version == 1
    assert adapter.metrics["eval_loss"] > 0 and adapter.metrics["included"] == 2
    assert adapter.rank == round_obj.report["rank"]
    assert blobstore.exists(adapter.blob_cid)
    # The candidate is a valid PEFT DoRA adapter the engine loads; once approved it is servable.
    engine = training.get_engine()
    engine.load_adapter("candidate-check", adapter.path)
    engine.unload_adapter("candidate-check")

    # The round proposed the candidate in governance; a deposit and a Yes vote pass it, and the
    # passed proposal makes it the servable version of the expert.
    from django.conf import settings as conf

    from governance.actions import do_close_proposal, do_deposit, do_vote
    from governance.models import Proposal

    proposal = Proposal.objects.get(kind="adapter", target_id=adapter.pk)
    assert proposal.proposer == alice and f"round {round_obj.pk}" in proposal.title
    do_deposit(proposal.pk, alice, conf.R3MES_GOV_MIN_DEPOSIT)
    do_vote(proposal.pk, alice, {"yes": Decimal(1)})
    do_close_proposal(proposal.pk, force=True)
    adapter.refresh_from_db()
    assert adapter.status == Adapter.Status.APPROVED
    assert Adapter.servable()["general"] == adapter

    scores = {s.miner_key: s for s in MinerScore.objects.all()}
    assert scores["node:local"].accepted == 2 and scores[f"user:{alice.pk}"].rejected == 1
    assert scores["node:local"].ema_improvement > scores[f"user:{alice.pk}"].ema_improvement

    # The ledger holds the round's story, ending with the adapter's approval.
    from mining.models import Transaction

    types = list(Transaction.objects.values_list("tx_type", flat=True))
    assert types.count("submission") == 3 and "round_opened" in types and "adapter_approved" in types
    assert Transaction.objects.get(tx_type="aggregation").payload["merkle_root"] == round_obj.merkle_root

    # Idempotent: replaying the tasks changes nothing.
    assert actions.do_train_shard(round_obj.pk, 0) is None
    assert actions.do_aggregate_round(round_obj.pk) is None
    assert Submission.objects.filter(round=round_obj).count() == 3 and Adapter.objects.count() == 1

    page = api_client.get(reverse("mining-round", args=[round_obj.pk]))
    assert b"<polyline" in page.content and b"update norm" in page.content and round_obj.merkle_root.encode() in page.content
