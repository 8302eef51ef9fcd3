"""Mining work that spans several models: datasets, rounds, shard training, submissions and the
one-time aggregation of a round into a candidate adapter. Views, the API and Celery tasks call
these; each writes inside a transaction so a refused or failed step leaves nothing half-done."""

import hashlib
import logging
import math
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone

from r3mes_site import metrics

from . import blobstore
from .datasets import parse_dataset
from .merkle import merkle_root
from .models import Dataset, MinerScore, Round, Submission, local_miner_key

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request that cannot be honoured; `status` is the HTTP status an API answers with."""

    def __init__(self, message, status=400, param=None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def record_ledger(tx_type, payload):
    from . import ledger  # imported here: the ledger imports the models this module defines actions on

    return ledger.record(tx_type, payload)


def _finite(value):
    """A float for the database and the ledger (canonical JSON forbids NaN/Inf), else None."""
    return value if isinstance(value, float) and math.isfinite(value) else None


def _progress_key(round_id, shard):
    return f"r3mes:mining:progress:{round_id}:{shard}"


def live_losses(round_obj):
    """{shard: [loss per step so far]} for shards training right now (from the cache)."""
    keys = {_progress_key(round_obj.pk, k): k for k in range(round_obj.shards)}
    found = cache.get_many(list(keys))
    return {keys[key]: value for key, value in found.items()}


# --- datasets ------------------------------------------------------------------------------------


def do_upload_dataset(user, *, name, expert, fmt, data, description=""):
    """Validate (every line), store the blob, create a pending Dataset. DatasetInvalid on bad data."""
    examples = parse_dataset(data, fmt)
    cid, size = blobstore.put_bytes(data)
    return Dataset.objects.create(
        name=name, expert=expert, format=fmt, blob_cid=cid, sha256=blobstore.sha256_hex_from_cid(cid),
        size_bytes=size, examples=len(examples), description=description, uploaded_by=user)


# --- rounds --------------------------------------------------------------------------------------


def check_can_open_round(user):
    if not user.is_authenticated:
        raise Refused("Log in to open a round", status=401)
    if not (user.is_staff or user.stake >= settings.MINING_MIN_STAKE_TO_OPEN_ROUND):
        raise Refused(f"Opening a round needs staff rights or a stake of at least "
                      f"{settings.MINING_MIN_STAKE_TO_OPEN_ROUND}", status=403)


def do_open_round(user, dataset, **config):
    """Open a round on an approved dataset (starting from the expert's servable adapter)."""
    from inference.models import Adapter

    check_can_open_round(user)
    if dataset.status != Dataset.Status.APPROVED:
        raise Refused(f"Dataset {dataset} is {dataset.status}; only approved datasets can be mined", status=409,
                      param="dataset")
    shards = int(config.get("shards", 2))
    eval_fraction = float(config.get("eval_fraction", 0.1))
    n_eval = max(1, int(dataset.examples * eval_fraction))
    if dataset.examples - n_eval < shards:
        raise Refused(f"Dataset {dataset} has {dataset.examples} examples: too few for {shards} shards plus "
                      f"{n_eval} held out for evaluation", param="shards")
    with transaction.atomic():
        round_obj = Round.objects.create(expert=dataset.expert, dataset=dataset, created_by=user,
                                         base_adapter=Adapter.servable().get(dataset.expert), **config)
        record_ledger("round_opened", {
            "round": round_obj.pk, "expert": round_obj.expert, "dataset": dataset.pk, "dataset_cid": dataset.blob_cid,
            "shards": shards, "rank": round_obj.rank, "alpha": round_obj.alpha, "lr": round_obj.lr,
            "steps": round_obj.steps, "batch_size": round_obj.batch_size, "seed": round_obj.seed,
            "method": round_obj.method,
            "base_adapter": round_obj.base_adapter_id,
        })
    return round_obj


def do_start_round(round_obj):
    """Queue the preparation (starting adapter, baseline loss) and, after it, the shard training."""
    from . import tasks

    if round_obj.status != Round.Status.OPEN:
        raise Refused(f"Round {round_obj.pk} is {round_obj.status}, not open", status=409)
    transaction.on_commit(lambda: tasks.prepare_round.delay(round_obj.pk))


def round_data(round_obj):
    """(eval examples, shard example lists) from the verified dataset blob."""
    return round_obj.split(round_obj.dataset.load_examples())


def do_prepare_round(round_id):
    """open → training (once): pack the starting adapter, measure the baseline eval loss, queue shards."""
    from . import tasks, training

    round_obj = Round.objects.get(pk=round_id)
    if not round_obj.start_training():
        # A redelivered task (the worker died mid-preparation) finishes the job; any other
        # state means another worker prepared this round already.
        if not (round_obj.status == Round.Status.TRAINING and not round_obj.base_cid):
            return False
    try:
        engine = training.get_engine()
        eval_part, _ = round_data(round_obj)
        name = f"round{round_obj.pk}-base"
        with tempfile.TemporaryDirectory() as tmp:
            if round_obj.base_adapter is not None:
                base = round_obj.base_adapter
                data = blobstore.read_bytes(base.blob_cid) if base.blob_cid else training.pack_dir(base.path)
            else:
                engine.new_adapter(name, round_obj.rank, round_obj.alpha,
                                   round_obj.target_modules or _default_targets(), seed=round_obj.seed)
                try:
                    engine.save_adapter(name, tmp)
                finally:
                    engine.unload_adapter(name)
                data = training.pack_dir(tmp)
        cid, _ = blobstore.put_bytes(data)
        baseline = training.eval_packed(engine, data, eval_part, name)
        Round.objects.filter(pk=round_obj.pk).update(base_cid=cid, baseline_eval_loss=_finite(baseline))
    except Exception as exc:
        log.exception("round %s: preparation failed", round_id)
        round_obj.fail(f"preparation failed: {exc}")
        metrics.jobs.labels("mining_prepare", "failed").inc()
        return False
    metrics.jobs.labels("mining_prepare", "ok").inc()
    if round_obj.train_locally:
        for shard in range(round_obj.shards):
            tasks.train_shard.delay(round_obj.pk, shard)
    return True


def _default_targets():
    from inference.engine.dora import DEFAULT_TARGETS

    return list(DEFAULT_TARGETS)


def do_train_shard(round_id, shard):
    """Train one shard on this node and record its Submission (idempotent per round/shard/node)."""
    from inference.engine.train import TrainConfig, train_dora

    from . import training

    round_obj = Round.objects.select_related("dataset").get(pk=round_id)
    key = local_miner_key()
    if round_obj.status != Round.Status.TRAINING or Submission.objects.filter(
            round=round_obj, shard=shard, miner_key=key).exists():
        return None
    engine = training.get_engine()
    name = f"round{round_id}-shard{shard}"
    progress = _progress_key(round_id, shard)
    losses = []

    def on_step(step, loss):
        losses.append(loss)
        cache.set(progress, list(losses), timeout=3600)

    try:
        eval_part, shards = round_data(round_obj)
        examples = shards[shard]
        config = TrainConfig(rank=round_obj.rank, alpha=round_obj.alpha, lr=round_obj.lr, steps=round_obj.steps,
                             batch_size=round_obj.batch_size, seed=round_obj.seed + shard,
                             target_modules=tuple(round_obj.target_modules or _default_targets()))
        with tempfile.TemporaryDirectory() as tmp:
            base_dir = training.unpack_to_dir(blobstore.read_bytes(round_obj.base_cid), Path(tmp) / "base")
            try:
                result = train_dora(engine, examples, config, adapter=name, init_from=base_dir, on_step=on_step,
                                    save_to=Path(tmp) / "out")
                loss = training.eval_loss(engine, eval_part, name)
            finally:
                if name in engine.adapters:
                    engine.unload_adapter(name)
            data = training.pack_dir(Path(tmp) / "out")
        cid, size = blobstore.put_bytes(data)
    except Exception as exc:
        log.exception("round %s shard %s: training failed", round_id, shard)
        round_obj.fail(f"shard {shard}: training failed: {exc}")
        metrics.jobs.labels("mining_shard", "failed").inc()
        cache.delete(progress)
        return None
    try:
        with transaction.atomic():
            submission = Submission.objects.create(
                round=round_obj, shard=shard, miner_key=key, miner_name=key, blob_cid=cid,
                sha256=blobstore.sha256_hex_from_cid(cid), size_bytes=size, examples=len(examples),
                train_losses=result.losses, eval_loss=_finite(loss), seconds=result.seconds)
            _record_submission(submission)
    except IntegrityError:
        return None  # another worker recorded this shard first
    finally:
        cache.delete(progress)
    metrics.jobs.labels("mining_shard", "ok").inc()
    _maybe_aggregate(round_obj.pk)
    return submission


def _record_submission(submission):
    record_ledger("submission", {
        "round": submission.round_id, "shard": submission.shard, "miner": submission.miner_name,
        "blob_cid": submission.blob_cid, "sha256": submission.sha256, "examples": submission.examples,
        "final_train_loss": submission.train_losses[-1] if submission.train_losses else None,
        "eval_loss": submission.eval_loss, "status": submission.status})


def _maybe_aggregate(round_id):
    from . import tasks

    round_obj = Round.objects.get(pk=round_id)
    if round_obj.can_aggregate():
        transaction.on_commit(lambda: tasks.aggregate_round.delay(round_id))


# --- external submissions ------------------------------------------------------------------------


def check_adapter_blob(round_obj, data):
    """(state, config) of a packed adapter that fits the round, or Refused(422) saying why."""
    from . import aggregation, training

    try:
        state, config = training.unpack(data)
        modules = aggregation.parse_adapter(state, training.scaling_of(config))
    except (training.BadAdapterBlob, aggregation.Rejected) as exc:
        raise Refused(str(exc), status=422, param="file") from None
    if round_obj.base_cid:
        base_state, base_config = training.unpack(blobstore.read_bytes(round_obj.base_cid))
        expected = aggregation.signature(aggregation.parse_adapter(base_state, training.scaling_of(base_config)))
        got = aggregation.signature(modules)
        if got != expected:
            raise Refused(aggregation._shape_difference(got, expected) + " (compared with the round's base adapter)",
                          status=422, param="file")
    return state, config


def do_submit(round_obj, user, data, metadata):
    """An external miner's submission for one shard: checked, stored, recorded. Refused on bad input."""
    if not round_obj.accepts_submissions():
        raise Refused(f"Round {round_obj.pk} is {round_obj.status}; it no longer accepts submissions", status=409)
    shard = metadata.get("shard")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < round_obj.shards:
        raise Refused(f"'shard' must be an integer from 0 to {round_obj.shards - 1}", status=422, param="shard")
    if len(data) > settings.MINING_MAX_SUBMISSION_BYTES:
        raise Refused(f"The blob is {len(data)} bytes; the limit is {settings.MINING_MAX_SUBMISSION_BYTES}",
                      status=413, param="file")
    digest = hashlib.sha256(data).hexdigest()
    claimed = metadata.get("sha256")
    if not isinstance(claimed, str) or claimed.lower() != digest:
        raise Refused(f"sha256 mismatch: the blob hashes to {digest}, metadata says {claimed!r}", param="sha256")
    cid = blobstore.cid_from_digest(bytes.fromhex(digest))
    if metadata.get("cid") not in (None, cid):
        raise Refused(f"CID mismatch: the blob's CID is {cid}, metadata says {metadata['cid']!r}", param="cid")
    examples = metadata.get("examples", 0)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise Refused("'examples' must be a positive integer (examples trained on)", status=422, param="examples")
    losses = metadata.get("train_losses", [])
    if not isinstance(losses, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               for x in losses) or len(losses) > 100_000:
        raise Refused("'train_losses' must be a list of numbers", status=422, param="train_losses")
    key = f"user:{user.pk}"
    if Submission.objects.filter(round=round_obj, shard=shard, miner_key=key).exists():
        raise Refused(f"You already submitted shard {shard} of round {round_obj.pk}", status=409, param="shard")
    check_adapter_blob(round_obj, data)
    blobstore.put_bytes(data)
    try:
        with transaction.atomic():
            submission = Submission.objects.create(
                round=round_obj, shard=shard, miner_key=key, miner_name=user.username, user=user, blob_cid=cid,
                sha256=digest, size_bytes=len(data), examples=examples,
                train_losses=[float(x) for x in losses][:10_000])
            _record_submission(submission)
    except IntegrityError:
        raise Refused(f"You already submitted shard {shard} of round {round_obj.pk}", status=409,
                      param="shard") from None
    _maybe_aggregate(round_obj.pk)
    return submission


# --- aggregation ---------------------------------------------------------------------------------


def do_aggregate_round(round_id):
    """training → aggregating (exactly once), aggregate the pending submissions into a candidate
    adapter, score the miners, record the result. Any failure marks the round failed."""
    round_obj = Round.objects.get(pk=round_id)
    if not round_obj.claim_aggregation():
        return None
    started = time.perf_counter()
    try:
        adapter = _aggregate(round_obj)
    except Exception as exc:
        log.exception("round %s: aggregation failed", round_id)
        round_obj.fail(f"aggregation failed: {exc}")
        metrics.jobs.labels("mining_aggregate", "failed").inc()
        return None
    metrics.jobs.labels("mining_aggregate", "ok").inc()
    log.info("round %s aggregated into %s in %.1f s", round_id, adapter, time.perf_counter() - started)
    return adapter


def _aggregate(round_obj):
    from inference.models import Adapter

    from . import aggregation, training

    engine = training.get_engine()
    eval_part, _ = round_data(round_obj)
    submissions = list(round_obj.submissions.filter(status=Submission.Status.PENDING).order_by("pk"))
    reasons, adapters, usable = {}, [], []
    for sub in submissions:
        try:
            data = blobstore.read_bytes(sub.blob_cid)
            state, config = training.unpack(data)
            if sub.eval_loss is None:  # external miners' claims are not trusted: measure here
                sub.eval_loss = _finite(
                    training.eval_packed(engine, data, eval_part, f"round{round_obj.pk}-eval{sub.pk}"))
            adapters.append((state, training.scaling_of(config)))
            usable.append(sub)
        except (blobstore.BlobError, training.BadAdapterBlob) as exc:
            reasons[sub.pk] = f"blob unusable: {exc}"
        except Exception as exc:  # the engine refused the adapter (shapes, NaN…): the miner's fault
            reasons[sub.pk] = f"adapter could not be evaluated: {exc}"
    if not usable:
        raise ValueError("no usable submissions")
    base_state, base_config = training.unpack(blobstore.read_bytes(round_obj.base_cid))
    state, report = aggregation.aggregate(
        adapters, round_obj.method, weights=[s.examples for s in usable],
        base=(base_state, training.scaling_of(base_config)), rank=round_obj.output_rank or None)
    for index, sub in enumerate(usable):
        if index in report.rejected:
            reasons[sub.pk] = report.rejected[index]
    included = [usable[i] for i in report.included]
    root = merkle_root(sorted(s.blob_cid for s in included))

    version = Adapter.next_version(round_obj.expert)
    adapter_dir = Path(settings.ADAPTER_DIR) / round_obj.expert / f"v{version}-round{round_obj.pk}"
    config = training.peft_config(report.rank, report.alpha, round_obj.target_modules or _default_targets(),
                                  base_config.get("base_model_name_or_path"))
    packed = training.pack(state, config)
    training.write_dir(state, config, adapter_dir)
    try:
        cid, size = blobstore.put_bytes(packed)
        eval_after = _finite(training.eval_packed(engine, packed, eval_part, f"round{round_obj.pk}-aggregate"))
        with transaction.atomic():
            for sub in submissions:
                if sub.pk in reasons:
                    sub.status, sub.reason = Submission.Status.REJECTED, reasons[sub.pk]
                else:
                    sub.status, sub.reason = Submission.Status.ACCEPTED, "included in the aggregate"
                sub.save(update_fields=["status", "reason", "eval_loss"])
                MinerScore.record(sub)
            adapter = Adapter.objects.create(
                expert=round_obj.expert, version=version, path=str(adapter_dir), blob_cid=cid,
                sha256=hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest(),
                base_model=config["base_model_name_or_path"] or "", rank=report.rank, alpha=report.alpha,
                target_modules=config["target_modules"], size_bytes=size, created_by=round_obj.created_by,
                metrics={"eval_loss": eval_after, "baseline_eval_loss": round_obj.baseline_eval_loss,
                         "round": round_obj.pk, "method": round_obj.method, "included": len(included),
                         "rejected": len(reasons), "svd_error": report.svd_error, "exact": report.exact})
            report_dict = report.as_dict()
            report_dict["submissions"] = [s.pk for s in usable]
            moved = Round.objects.filter(pk=round_obj.pk, status=Round.Status.AGGREGATING).update(
                status=Round.Status.DONE, merkle_root=root, report=report_dict, result=adapter,
                finished_at=timezone.now())
            if not moved:
                raise RuntimeError("the round left the aggregating state while it was being aggregated")
            record_ledger("aggregation", {
                "round": round_obj.pk, "expert": round_obj.expert, "method": round_obj.method,
                "merkle_root": root, "included": sorted(s.blob_cid for s in included),
                "rejected": {str(pk): reason for pk, reason in reasons.items()},
                "adapter": adapter.pk, "adapter_version": version, "adapter_cid": cid, "eval_loss": eval_after})
    except BaseException:
        shutil.rmtree(adapter_dir, ignore_errors=True)
        raise
    _propose(round_obj, adapter, eval_after)
    return adapter


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"


def _propose(round_obj, adapter, eval_loss):
    """An adapter proposal in governance, opened by the round's creator."""
    from governance.actions import do_create_proposal as create  # governance imports mining

    if round_obj.created_by is None:
        return None
    round_obj.refresh_from_db()
    baseline = round_obj.baseline_eval_loss
    description = (f"Aggregated by round {round_obj.pk} ({round_obj.method}) from "
                   f"{len(round_obj.report.get('included', []))} submissions. "
                   f"Eval loss {_fmt(eval_loss)} (baseline {_fmt(baseline)}). "
                   f"Merkle root `{round_obj.merkle_root}`.")
    try:
        return create(round_obj.created_by, kind="adapter", target=adapter.pk,
                      title=f"Approve {adapter.expert} v{adapter.version} from mining round {round_obj.pk}",
                      description=description)
    except Exception as exc:  # governance refusing (e.g. an open proposal) must not undo the round
        log.warning("round %s: could not create the adapter proposal: %s", round_obj.pk, exc)
        return None


def do_expire_stuck_rounds(now=None):
    """Fail rounds that have trained or aggregated for longer than MINING_ROUND_TIMEOUT seconds
    (a lost worker, external miners who never came), so no round stays 'in progress' forever."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.MINING_ROUND_TIMEOUT)
    expired = []
    for round_obj in Round.objects.filter(status__in=[Round.Status.TRAINING, Round.Status.AGGREGATING],
                                          started_at__lt=cutoff):
        if round_obj.fail(f"timed out after {settings.MINING_ROUND_TIMEOUT} s in {round_obj.status}"):
            expired.append(round_obj.pk)
    return expired
