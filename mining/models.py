import math

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone

from . import blobstore

# Keys are mining.aggregation.METHODS (a test keeps them in step; torch is not imported here).
METHOD_CHOICES = [
    ("mean", "Mean weighted by examples"),
    ("trimmed_mean", "Trimmed mean (beta 0.2)"),
    ("median", "Coordinate-wise median"),
    ("krum", "Krum"),
    ("multi_krum", "Multi-Krum"),
]

# --- Datasets and rounds ---


class Dataset(models.Model):
    """Training data for an expert: JSONL (instruction/response or chat messages) or plain text,
    stored as a content-addressed blob. Governance makes it minable (`approve()`)."""

    class Format(models.TextChoices):
        JSONL = "jsonl"
        TEXT = "text"

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"

    name = models.CharField(max_length=200)
    expert = models.SlugField(max_length=40)
    format = models.CharField(max_length=10, choices=Format.choices)
    blob_cid = models.CharField(max_length=100)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField(default=0)
    examples = models.PositiveIntegerField(default=0)
    description = models.TextField(blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(default=timezone.now)
    approved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return f"{self.name} ({self.expert})"

    def approve(self):
        self.status = self.Status.APPROVED
        self.approved_at = timezone.now()
        self.save(update_fields=["status", "approved_at"])

    def reject(self):
        self.status = self.Status.REJECTED
        self.save(update_fields=["status"])

    @property
    def is_minable(self):
        return self.status == self.Status.APPROVED

    def load_examples(self):
        """The examples, parsed again from the verified blob (raises blobstore errors if corrupt)."""
        from .datasets import parse_dataset

        return parse_dataset(blobstore.read_bytes(self.blob_cid), self.format)

    def preview(self, limit=20):
        return self.load_examples()[:limit]


class Round(models.Model):
    """One mining round: shards of an approved dataset trained into DoRA updates for an expert,
    then aggregated once into a candidate adapter version."""

    class Status(models.TextChoices):
        OPEN = "open"
        TRAINING = "training"
        AGGREGATING = "aggregating"
        DONE = "done"
        FAILED = "failed"

    expert = models.SlugField(max_length=40)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="rounds")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    shards = models.PositiveSmallIntegerField(default=2)
    rank = models.PositiveSmallIntegerField(default=8)
    alpha = models.FloatField(default=16.0)
    lr = models.FloatField(default=1e-3)
    steps = models.PositiveIntegerField(default=20)
    batch_size = models.PositiveSmallIntegerField(default=4)
    seed = models.PositiveIntegerField(default=0)
    target_modules = models.JSONField(default=list)
    method = models.CharField(max_length=20, choices=METHOD_CHOICES, default="trimmed_mean")
    output_rank = models.PositiveSmallIntegerField(
        default=0, help_text="Rank of the aggregated adapter; 0 keeps the exact stacked/SVD result")
    eval_fraction = models.FloatField(default=0.1)
    train_locally = models.BooleanField(default=True, help_text="This node's Celery workers train every shard")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.OPEN, db_index=True)
    error = models.TextField(blank=True)
    base_adapter = models.ForeignKey("inference.Adapter", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+", help_text="Approved adapter the shards start from")
    base_cid = models.CharField(max_length=100, blank=True, help_text="Packed starting adapter (blob)")
    baseline_eval_loss = models.FloatField(null=True, blank=True)
    merkle_root = models.CharField(max_length=64, blank=True)
    report = models.JSONField(default=dict, blank=True)
    result = models.ForeignKey("inference.Adapter", null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="rounds")
    created = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return f"round {self.pk} ({self.expert})"

    @property
    def scaling(self):
        return self.alpha / self.rank

    def accepts_submissions(self):
        return self.status in (self.Status.OPEN, self.Status.TRAINING)

    def split(self, examples):
        """Deterministic split by the round's seed: (eval examples, [shard examples...]). Every
        node computes the same split from the dataset blob, so external miners can train theirs."""
        import random

        order = list(range(len(examples)))
        random.Random(self.seed).shuffle(order)
        n_eval = max(1, int(len(examples) * self.eval_fraction)) if len(examples) > self.shards else 0
        eval_part = [examples[i] for i in order[:n_eval]]
        rest = order[n_eval:]
        return eval_part, [[examples[i] for i in rest[k::self.shards]] for k in range(self.shards)]

    def _transition(self, source, target, **fields):
        """Conditional UPDATE: True only for the one caller that moved the round (row count 1)."""
        sources = source if isinstance(source, (list, tuple)) else [source]
        moved = Round.objects.filter(pk=self.pk, status__in=sources).update(status=target, **fields)
        if moved:
            self.refresh_from_db()
        return bool(moved)

    def start_training(self):
        return self._transition(self.Status.OPEN, self.Status.TRAINING, started_at=timezone.now())

    def claim_aggregation(self):
        return self._transition(self.Status.TRAINING, self.Status.AGGREGATING)

    def fail(self, reason):
        return self._transition([self.Status.OPEN, self.Status.TRAINING, self.Status.AGGREGATING],
                                self.Status.FAILED, error=reason[:4000], finished_at=timezone.now())

    def shards_done(self):
        return set(self.submissions.values_list("shard", flat=True))

    def can_aggregate(self):
        """Every shard has a submission: from this node when it trains locally, else from anyone."""
        subs = self.submissions.all()
        if self.train_locally:
            subs = subs.filter(miner_key=local_miner_key())
        return self.status == self.Status.TRAINING and len(set(subs.values_list("shard", flat=True))) >= self.shards


def local_miner_key():
    return f"node:{settings.MINING_NODE_NAME}"


class Submission(models.Model):
    """One trained shard update: a packed adapter blob from a miner (a user or a node)."""

    class Status(models.TextChoices):
        PENDING = "pending"  # valid, waiting for aggregation
        ACCEPTED = "accepted"  # included in the aggregate
        REJECTED = "rejected"

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="submissions")
    shard = models.PositiveSmallIntegerField()
    miner_key = models.CharField(max_length=120, help_text="'user:<id>' or 'node:<name>'")
    miner_name = models.CharField(max_length=150)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    blob_cid = models.CharField(max_length=100, blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    size_bytes = models.PositiveBigIntegerField(default=0)
    examples = models.PositiveIntegerField(default=0)
    train_losses = models.JSONField(default=list, blank=True)
    eval_loss = models.FloatField(null=True, blank=True)
    seconds = models.FloatField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    reason = models.TextField(blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["round", "shard", "created"]
        constraints = [models.UniqueConstraint(fields=["round", "shard", "miner_key"], name="unique_round_shard_miner")]

    def __str__(self):
        return f"{self.miner_name} shard {self.shard} of round {self.round_id}"

    @property
    def improvement(self):
        if self.eval_loss is None or self.round.baseline_eval_loss is None:
            return None
        return self.round.baseline_eval_loss - self.eval_loss


class MinerScore(models.Model):
    """Per miner: accepted/rejected counts and an EMA of eval-loss improvement (Bittensor-style)."""

    miner_key = models.CharField(max_length=120, unique=True)
    miner_name = models.CharField(max_length=150)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    accepted = models.PositiveIntegerField(default=0)
    rejected = models.PositiveIntegerField(default=0)
    ema_improvement = models.FloatField(null=True, blank=True)
    rounds = models.PositiveIntegerField(default=0)
    updated = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = [F("ema_improvement").desc(nulls_last=True), "-accepted"]

    def __str__(self):
        return self.miner_name

    @classmethod
    def record(cls, submission):
        """Counts one aggregated submission; EMA over the submissions that have an eval loss."""
        score, _ = cls.objects.select_for_update().get_or_create(
            miner_key=submission.miner_key,
            defaults={"miner_name": submission.miner_name, "user": submission.user})
        if submission.status == Submission.Status.ACCEPTED:
            score.accepted += 1
        else:
            score.rejected += 1
        improvement = submission.improvement
        if improvement is not None and math.isfinite(improvement):
            a = settings.MINING_SCORE_EMA_ALPHA
            score.ema_improvement = (improvement if score.ema_improvement is None
                                     else a * improvement + (1 - a) * score.ema_improvement)
        score.rounds += 1
        score.updated = timezone.now()
        score.save()
        return score


class ModelVersion(models.Model):
    """A backbone version that nodes can download, verify and activate (via governance)."""

    class Status(models.TextChoices):
        AVAILABLE = "available"
        ACTIVE = "active"
        RETIRED = "retired"

    name = models.CharField(max_length=100, unique=True)
    file_name = models.CharField(max_length=255)
    source_url = models.URLField(max_length=1000, blank=True)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField(default=0)
    blob_cid = models.CharField(max_length=100, blank=True)
    architecture = models.CharField(max_length=40, default="llama")
    description = models.TextField(blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.AVAILABLE, db_index=True)
    created = models.DateTimeField(default=timezone.now)
    activated_at = models.DateTimeField(null=True, blank=True)
    previous = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return self.name

    @classmethod
    def active(cls):
        return cls.objects.filter(status=cls.Status.ACTIVE).first()


# --- Ledger, peers and model versions ---------------------------------------------------------
# A ModelVersion's download state on this node lives in `BackboneFetch`, so the shared model keeps
# its fields; mining/model_versions.py fetches, activates and rolls back.

HEX64 = RegexValidator(r"^[0-9a-f]{64}$", "Must be 64 lowercase hex characters (an ed25519 public key).")


class Peer(models.Model):
    """Another R3MES node whose ledger this node replicates. Its blocks must be signed by
    `public_key`, pinned here by the operator (admin), not learnt from the peer itself."""

    name = models.CharField(max_length=100, unique=True)
    url = models.URLField(max_length=500, help_text="Base URL, e.g. https://node.example.org")
    public_key = models.CharField(max_length=64, validators=[HEX64], help_text="From the peer's /api/chain/node")
    enabled = models.BooleanField(default=True)
    apply_announcements = models.BooleanField(
        default=True, help_text="Approve locally the adapters and datasets this peer's ledger announces"
    )
    last_height = models.PositiveBigIntegerField(default=0)
    last_error = models.TextField(blank=True)
    last_sync_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def endpoint(self, path):
        return f"{self.url.rstrip('/')}{path}"

    def head(self):
        return self.blocks.order_by("-height").first()

    def record_error(self, message):
        self.last_error = message[:2000]
        self.last_sync_at = timezone.now()
        self.save(update_fields=["last_error", "last_sync_at"])

    def record_success(self):
        self.last_error = ""
        self.last_sync_at = self.last_success_at = timezone.now()
        self.save(update_fields=["last_error", "last_sync_at", "last_success_at"])


class Block(models.Model):
    """A signed, hash-linked block. `origin` is empty for this node's own chain and names the peer
    for a replicated chain, so the two never mix (heights are unique per origin)."""

    origin = models.ForeignKey(Peer, null=True, blank=True, on_delete=models.CASCADE, related_name="blocks")
    height = models.PositiveBigIntegerField()
    hash = models.CharField(max_length=64, db_index=True)
    previous_hash = models.CharField(max_length=64)
    merkle_root = models.CharField(max_length=64)
    # Kept as the exact string that was signed, so a round trip through the database cannot
    # change the header's bytes.
    timestamp = models.CharField(max_length=40)
    proposer = models.CharField(max_length=64)
    signature = models.CharField(max_length=128)
    tx_count = models.PositiveIntegerField(default=0)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["origin_id", "height"]
        constraints = [
            models.UniqueConstraint(
                fields=["height"], condition=models.Q(origin__isnull=True), name="unique_local_block_height"
            ),
            models.UniqueConstraint(fields=["origin", "height"], name="unique_peer_block_height"),
        ]

    def __str__(self):
        return f"block {self.height}" + (f" from {self.origin}" if self.origin_id else "")

    @property
    def time(self):
        from datetime import datetime

        try:
            return datetime.fromisoformat(self.timestamp.replace("Z", "+00:00"))
        except ValueError:
            return None

    def header(self):
        return {
            "height": self.height,
            "previous_hash": self.previous_hash,
            "merkle_root": self.merkle_root,
            "timestamp": self.timestamp,
            "proposer": self.proposer,
            "tx_count": self.tx_count,
        }

    def as_dict(self):
        """The block as served by /api/chain/blocks and checked by `ledger.check_block`."""
        return {
            **self.header(),
            "hash": self.hash,
            "signature": self.signature,
            "transactions": [tx.as_dict() for tx in self.transactions.all()],
        }


class Transaction(models.Model):
    block = models.ForeignKey(Block, on_delete=models.CASCADE, related_name="transactions")
    index = models.PositiveIntegerField()
    tx_type = models.CharField(max_length=40, db_index=True)
    payload = models.JSONField()
    timestamp = models.CharField(max_length=40)
    hash = models.CharField(max_length=64, db_index=True)

    class Meta:
        ordering = ["block_id", "index"]
        constraints = [models.UniqueConstraint(fields=["block", "index"], name="unique_tx_index_in_block")]

    def __str__(self):
        return f"{self.tx_type} {self.hash[:12]}"

    def body(self):
        return {"type": self.tx_type, "payload": self.payload, "timestamp": self.timestamp}

    def as_dict(self):
        return {"index": self.index, **self.body(), "hash": self.hash}

    def payload_pretty(self):
        import json

        return json.dumps(self.payload, indent=2, sort_keys=True, ensure_ascii=False)


class BackboneFetch(models.Model):
    """Download state of a ModelVersion on this node (one row per version): what the models page
    shows and what guards against two fetches of the same version at once."""

    class State(models.TextChoices):
        IDLE = "idle"
        FETCHING = "fetching"
        READY = "ready"
        FAILED = "failed"

    version = models.OneToOneField(ModelVersion, on_delete=models.CASCADE, related_name="fetch")
    state = models.CharField(max_length=10, choices=State.choices, default=State.IDLE)
    source = models.CharField(max_length=200, blank=True, help_text="Where the verified file came from")
    error = models.TextField(blank=True)
    bytes_done = models.PositiveBigIntegerField(default=0)
    updated = models.DateTimeField(default=timezone.now)

    # A fetch that has not reported progress for this long died with its process; it may be
    # claimed again (and resumes from the partial file).
    STALE_AFTER_S = 120

    def __str__(self):
        return f"{self.version} {self.state}"

    @property
    def is_running(self):
        return self.state == self.State.FETCHING and (timezone.now() - self.updated).total_seconds() < self.STALE_AFTER_S

    @property
    def percent(self):
        size = self.version.size_bytes
        return min(100, int(self.bytes_done * 100 / size)) if size else None
