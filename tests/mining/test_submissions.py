"""External submissions and round rules, with small synthetic adapters (no engine needed: the
round's base adapter is a synthetic one, as shapes are all these rules look at)."""

import hashlib
import json
from decimal import Decimal

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from mining import actions, blobstore, training
from mining.models import MinerScore, Round, Submission
from tests.mining.test_aggregation import make_adapter

ROWS = b"\n".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}).encode() for i in range(20))


def packed(state, rank=4, alpha=8.0):
    return training.pack(state, training.peft_config(rank, alpha, ["q_proj", "down_proj"]))


@pytest.fixture
def dataset(alice):
    dataset = actions.do_upload_dataset(alice, name="qa", expert="math", fmt="jsonl", data=ROWS)
    dataset.approve()
    return dataset


@pytest.fixture
def round_obj(alice, dataset):
    round_obj = actions.do_open_round(alice, dataset, shards=2, rank=4, alpha=8.0, steps=1,
                                      target_modules=["q_proj", "down_proj"], train_locally=False)
    cid, _ = blobstore.put_bytes(packed(make_adapter(0, spread=0)))
    Round.objects.filter(pk=round_obj.pk).update(base_cid=cid, status=Round.Status.TRAINING)
    round_obj.refresh_from_db()
    return round_obj


def submit(client, round_obj, data, **meta):
    metadata = {"shard": 0, "sha256": hashlib.sha256(data).hexdigest(), "examples": 9, **meta}
    return client.post(f"/api/mining/rounds/{round_obj.pk}/submissions",
                       {"file": SimpleUploadedFile("adapter.safetensors", data), "metadata": json.dumps(metadata)})


@pytest.mark.django_db
def test_rounds_on_unapproved_datasets_are_refused(alice):
    dataset = actions.do_upload_dataset(alice, name="qa", expert="math", fmt="jsonl", data=ROWS)
    with pytest.raises(actions.Refused, match="pending; only approved datasets"):
        actions.do_open_round(alice, dataset, shards=2)
    assert not Round.objects.exists()


@pytest.mark.django_db
def test_users_without_stake_cannot_open_rounds(bob, dataset):
    bob.stake = Decimal("0")
    bob.save()
    with pytest.raises(actions.Refused, match="stake"):
        actions.do_open_round(bob, dataset, shards=2)


@pytest.mark.django_db
def test_too_many_shards_for_the_dataset_are_refused(alice, dataset):
    with pytest.raises(actions.Refused, match="too few for 30 shards"):
        actions.do_open_round(alice, dataset, shards=30)


@pytest.mark.django_db
def test_round_form_only_offers_approved_datasets_and_opens_a_round(alice_client, dataset, alice):
    pending = actions.do_upload_dataset(alice, name="other", expert="math", fmt="jsonl", data=ROWS)
    page = alice_client.get(reverse("mining-rounds"))
    assert page.status_code == 200
    assert b"qa (math)</option>" in page.content and b"other (math)</option>" not in page.content
    response = alice_client.post(reverse("mining-rounds"), {
        "dataset": dataset.pk, "shards": 2, "rank": 4, "alpha": 8, "lr": 0.001, "steps": 2, "batch_size": 2,
        "seed": 0, "method": "median", "output_rank": 0, "eval_fraction": 0.1, "train_locally": "on",
        "targets": ["q_proj", "v_proj"]})
    round_obj = Round.objects.get()
    assert response.status_code == 302 and round_obj.status == "open"
    assert round_obj.target_modules == ["q_proj", "v_proj"] and round_obj.method == "median"
    detail = alice_client.get(reverse("mining-round", args=[round_obj.pk]))
    assert b"Start training" in detail.content and b"hx-get" in detail.content


@pytest.mark.django_db
def test_a_valid_submission_is_recorded_pending(api_client, round_obj, alice):
    response = submit(api_client, round_obj, packed(make_adapter(1)), train_losses=[2.0, 1.5])
    assert response.status_code == 201, response.content
    sub = Submission.objects.get()
    assert (sub.miner_name, sub.shard, sub.status, sub.examples) == ("alice", 0, "pending", 9)
    assert blobstore.sha256_hex_from_cid(sub.blob_cid) == sub.sha256
    assert sub.eval_loss is None  # measured by the node at aggregation, never taken from the miner


@pytest.mark.django_db
def test_duplicate_submissions_are_refused(api_client, round_obj):
    assert submit(api_client, round_obj, packed(make_adapter(1))).status_code == 201
    again = submit(api_client, round_obj, packed(make_adapter(2)))
    assert again.status_code == 409 and "already submitted shard 0" in again.json()["error"]["message"]
    assert Submission.objects.count() == 1


@pytest.mark.django_db
def test_submissions_for_closed_rounds_are_refused(api_client, round_obj):
    Round.objects.filter(pk=round_obj.pk).update(status=Round.Status.DONE)
    response = submit(api_client, round_obj, packed(make_adapter(1)))
    assert response.status_code == 409 and "no longer accepts submissions" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_hash_mismatch_is_refused_and_nothing_stored(api_client, round_obj):
    data = packed(make_adapter(4242))  # bytes no other test stores
    response = submit(api_client, round_obj, data, sha256="0" * 64)
    assert response.status_code == 400 and "sha256 mismatch" in response.json()["error"]["message"]
    cid_response = submit(api_client, round_obj, data, cid=blobstore.cid_for_bytes(b"other"))
    assert cid_response.status_code == 400 and "CID mismatch" in cid_response.json()["error"]["message"]
    assert not Submission.objects.exists() and not blobstore.exists(blobstore.cid_for_bytes(data))


@pytest.mark.django_db
def test_wrong_shapes_dtypes_nan_and_garbage_are_refused_with_reasons(api_client, round_obj):
    wide = make_adapter(1, modules={"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 99)})
    ints = make_adapter(1)
    ints["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] = torch.ones(16, 4, dtype=torch.int32)
    nan = make_adapter(1)
    nan["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][0, 0] = float("inf")
    cases = [(packed(wide), "16x99"), (packed(ints), "dtype int32"), (packed(nan), "NaN or Inf"),
             (b"garbage bytes", "not a safetensors file"),
             (training.pack(make_adapter(1), {"r": 4}), "lora_alpha")]
    for data, message in cases:
        response = submit(api_client, round_obj, data)
        assert response.status_code == 422, response.content
        assert message in response.json()["error"]["message"]
    assert not Submission.objects.exists()


@pytest.mark.django_db
def test_bad_metadata_is_refused(api_client, round_obj):
    data = packed(make_adapter(1))
    for meta, status, param in [({"shard": 5}, 422, "shard"), ({"shard": "0"}, 422, "shard"),
                                ({"examples": 0}, 422, "examples"), ({"train_losses": "low"}, 422, "train_losses")]:
        response = submit(api_client, round_obj, data, **meta)
        assert response.status_code == status and response.json()["error"]["param"] == param
    no_meta = api_client.post(f"/api/mining/rounds/{round_obj.pk}/submissions",
                              {"file": SimpleUploadedFile("a", data), "metadata": "{nope"})
    assert no_meta.status_code == 400 and no_meta.json()["error"]["param"] == "metadata"
    assert api_client.post("/api/mining/rounds/999/submissions", {}).status_code == 404


@pytest.mark.django_db
def test_round_api_describes_the_round_for_external_miners(api_client, round_obj):
    body = api_client.get(f"/api/mining/rounds/{round_obj.pk}").json()
    assert body["base_cid"] == round_obj.base_cid and body["dataset"]["blob_cid"] == round_obj.dataset.blob_cid
    assert body["shards"] == 2 and body["status"] == "training"


@pytest.mark.django_db
def test_a_round_is_claimed_for_aggregation_exactly_once(round_obj):
    first, second = Round.objects.get(pk=round_obj.pk), Round.objects.get(pk=round_obj.pk)
    assert first.claim_aggregation() is True
    assert second.claim_aggregation() is False
    assert Round.objects.get(pk=round_obj.pk).status == "aggregating"


@pytest.mark.django_db
def test_split_is_deterministic_and_disjoint(round_obj):
    examples = list(range(20))
    eval_part, shards = round_obj.split(examples)
    assert round_obj.split(examples) == (eval_part, shards)
    flat = eval_part + [x for shard in shards for x in shard]
    assert sorted(flat) == examples and len(eval_part) == 2 and len(shards) == 2


@pytest.mark.django_db
def test_miner_score_counts_and_ema(round_obj, alice):
    Round.objects.filter(pk=round_obj.pk).update(baseline_eval_loss=2.0)
    round_obj.refresh_from_db()
    for shard, (status, loss) in enumerate([("accepted", 1.5), ("rejected", 2.5)]):
        sub = Submission.objects.create(round=round_obj, shard=shard, miner_key="user:1", miner_name="alice",
                                        status=status, eval_loss=loss)
        MinerScore.record(sub)
    score = MinerScore.objects.get(miner_key="user:1")
    assert (score.accepted, score.rejected) == (1, 1)
    assert score.ema_improvement == pytest.approx(0.3 * -0.5 + 0.7 * 0.5)


@pytest.mark.django_db
def test_leaderboard_and_dashboard_render(client, round_obj):
    MinerScore.objects.create(miner_key="node:x", miner_name="node:x", accepted=3, ema_improvement=0.25)
    page = client.get(reverse("mining-leaderboard"))
    assert page.status_code == 200 and b"node:x" in page.content and b"0.2500" in page.content
    dashboard = client.get(reverse("mining"))
    assert dashboard.status_code == 200 and f"#{round_obj.pk}".encode() in dashboard.content
    for name in ("mining-ledger", "mining-models"):  # the chain pages, linked because they resolve
        assert f'href="{reverse(name)}"'.encode() in dashboard.content
    progress = client.get(reverse("mining-round-progress", args=[round_obj.pk]))
    assert progress.status_code == 200 and b"0 / 2" in progress.content


@pytest.mark.django_db
def test_rounds_stuck_past_the_timeout_are_failed_with_a_reason(round_obj, settings):
    from datetime import timedelta

    from django.utils import timezone

    settings.MINING_ROUND_TIMEOUT = 3600
    Round.objects.filter(pk=round_obj.pk).update(started_at=timezone.now() - timedelta(hours=2))
    assert actions.do_expire_stuck_rounds() == [round_obj.pk]
    round_obj.refresh_from_db()
    assert round_obj.status == "failed" and "timed out" in round_obj.error
    assert actions.do_expire_stuck_rounds() == []


def _queued_aggregations(round_id):
    """Aggregation tasks waiting in the real (test) Redis broker's default queue for this round."""
    from r3mes_site.api import redis_client

    found = []
    for raw in redis_client().lrange("celery", 0, -1):
        headers = json.loads(raw).get("headers", {})
        if headers.get("task") == "mining.tasks.aggregate_round" and headers.get("argsrepr") == f"({round_id},)":
            found.append(raw)
    return found


@pytest.mark.django_db
def test_external_only_round_queues_aggregation_when_every_shard_has_a_submission(
        api_client, round_obj, django_capture_on_commit_callbacks):
    from r3mes_site.api import redis_client

    for raw in _queued_aggregations(round_obj.pk):  # left by an earlier session's round with this id
        redis_client().lrem("celery", 0, raw)
    with django_capture_on_commit_callbacks(execute=True):
        assert submit(api_client, round_obj, packed(make_adapter(31))).status_code == 201
    assert _queued_aggregations(round_obj.pk) == []
    with django_capture_on_commit_callbacks(execute=True):
        assert submit(api_client, round_obj, packed(make_adapter(32)), shard=1).status_code == 201
    queued = _queued_aggregations(round_obj.pk)
    assert len(queued) == 1
    redis_client().lrem("celery", 0, queued[0])  # no worker runs in this test: leave the broker clean


@pytest.mark.django_db
def test_round_opening_and_submissions_are_recorded_on_the_ledger(api_client, round_obj):
    from mining.models import Transaction

    assert submit(api_client, round_obj, packed(make_adapter(41))).status_code == 201
    by_type = {t.tx_type: t.payload for t in Transaction.objects.all()}
    assert by_type["round_opened"]["round"] == round_obj.pk
    assert by_type["submission"]["miner"] == "alice" and by_type["submission"]["shard"] == 0
