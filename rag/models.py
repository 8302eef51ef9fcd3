from datetime import timedelta

import numpy as np
from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone


class Collection(models.Model):
    """A set of documents searched together; its FAISS and BM25 indexes live in INDEX_DIR/<id>/."""

    class Kind(models.TextChoices):
        GENERAL = "general"
        NEWS = "news"
        MEDICAL = "medical"
        LEGAL = "legal"
        CODE = "code"
        USER = "user"

    class Visibility(models.TextChoices):
        PRIVATE = "private", "Private (only me)"
        SHARED = "shared", "Shared with named users"
        PUBLIC = "public", "Public"

    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.USER)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="rag_collections")
    visibility = models.CharField(max_length=10, choices=Visibility.choices, default=Visibility.PRIVATE)
    shared_with = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="rag_shared_collections")
    news_ttl_days = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(3650)],
        help_text="News documents expire this many days after upload (news collections only)",
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "id"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="unique_collection_name_per_owner")]

    def __str__(self):
        return self.name

    @classmethod
    def readable_by(cls, user):
        """Collections `user` may search and read: public ones, their own, and ones shared with them."""
        if user is None or not user.is_authenticated:
            return cls.objects.filter(visibility=cls.Visibility.PUBLIC)
        return cls.objects.filter(
            Q(visibility=cls.Visibility.PUBLIC)
            | Q(owner=user)
            | Q(visibility=cls.Visibility.SHARED, shared_with=user)
        ).distinct()

    def can_read(self, user):
        return Collection.readable_by(user).filter(pk=self.pk).exists()

    def can_write(self, user):
        """Only the owner adds documents: a shared or public collection is read-only to others."""
        return user is not None and user.is_authenticated and user.pk == self.owner_id

    def expiry_for_new_document(self, now=None):
        if self.kind != self.Kind.NEWS:
            return None
        days = self.news_ttl_days or settings.R3MES_RAG_NEWS_TTL_DAYS
        return (now or timezone.now()) + timedelta(days=days)

    @property
    def index_dir(self):
        return settings.INDEX_DIR / str(self.pk)


class DocumentQuerySet(models.QuerySet):
    def live(self, now=None):
        """Documents whose passages may be retrieved: ready and not expired."""
        now = now or timezone.now()
        return self.filter(status=Document.Status.READY).filter(Q(expires__isnull=True) | Q(expires__gt=now))


class Document(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        PROCESSING = "processing"
        READY = "ready"
        FAILED = "failed"

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="documents")
    original_name = models.CharField(max_length=255)
    content_type = models.CharField(max_length=50)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED, db_index=True)
    progress = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(100)])
    error = models.TextField(blank=True)
    pages = models.PositiveIntegerField(default=0)
    chunk_count = models.PositiveIntegerField(default=0)
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Ingestion attempts so far")
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(default=timezone.now, help_text="Last status or progress change")
    expires = models.DateTimeField(null=True, blank=True, db_index=True)

    objects = DocumentQuerySet.as_manager()

    class Meta:
        ordering = ["-created", "-id"]
        constraints = [
            # The same file is never stored twice in one collection.
            models.UniqueConstraint(fields=["collection", "sha256"], name="unique_document_per_collection"),
        ]

    def __str__(self):
        return self.original_name

    def get_absolute_url(self):
        return reverse("document-detail", args=[self.pk])

    @property
    def blob_path(self):
        return settings.BLOB_DIR / "rag" / self.sha256[:2] / self.sha256

    @property
    def is_finished(self):
        return self.status in (self.Status.READY, self.Status.FAILED)

    def is_expired(self, now=None):
        return self.expires is not None and self.expires <= (now or timezone.now())

    def can_delete(self, user):
        return user is not None and user.is_authenticated and user.pk in (self.uploaded_by_id, self.collection.owner_id)

    # State changes are conditional UPDATEs so two workers (or a retry racing a stale run) never
    # both act on one document; each returns whether this caller won.

    def claim(self):
        """queued → processing. Only the caller that gets True may ingest."""
        now = timezone.now()
        won = Document.objects.filter(pk=self.pk, status=self.Status.QUEUED).update(
            status=self.Status.PROCESSING, progress=0, error="", attempts=models.F("attempts") + 1, updated=now
        )
        if won:
            self.refresh_from_db()
        return bool(won)

    def set_progress(self, percent):
        percent = max(0, min(100, int(percent)))
        Document.objects.filter(pk=self.pk, status=self.Status.PROCESSING).update(progress=percent, updated=timezone.now())
        self.progress = percent

    def mark_ready(self, pages, chunk_count):
        won = Document.objects.filter(pk=self.pk, status=self.Status.PROCESSING).update(
            status=self.Status.READY, progress=100, pages=pages, chunk_count=chunk_count, error="", updated=timezone.now()
        )
        if won:
            self.refresh_from_db()
        return bool(won)

    def mark_failed(self, reason):
        won = Document.objects.filter(pk=self.pk).exclude(status=self.Status.READY).update(
            status=self.Status.FAILED, error=str(reason)[:2000], updated=timezone.now()
        )
        if won:
            self.refresh_from_db()
        return bool(won)

    def requeue(self):
        """Back to queued (re-ingest, or a stale run): only from a finished or stuck state."""
        won = Document.objects.filter(pk=self.pk).exclude(status=self.Status.QUEUED).update(
            status=self.Status.QUEUED, progress=0, error="", updated=timezone.now()
        )
        if won:
            self.refresh_from_db()
        return bool(won)


class Chunk(models.Model):
    """A passage of a document: its text, page and character offsets into the extracted text, and
    its normalised embedding (the FAISS index is derived from these and can always be rebuilt)."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    ordinal = models.PositiveIntegerField()
    text = models.TextField()
    page = models.PositiveIntegerField(help_text="1-based page number (1 for formats without pages)")
    char_start = models.PositiveIntegerField()
    char_end = models.PositiveIntegerField()
    tokens = models.PositiveIntegerField(default=0)
    vector = models.BinaryField(help_text="float32 embedding, L2-normalised")

    class Meta:
        ordering = ["document_id", "ordinal"]
        constraints = [models.UniqueConstraint(fields=["document", "ordinal"], name="unique_chunk_ordinal")]

    def __str__(self):
        return f"{self.document} #{self.ordinal}"

    def embedding(self):
        return np.frombuffer(bytes(self.vector), dtype=np.float32)

    def snippet(self, length=240):
        text = " ".join(self.text.split())
        if len(text) <= length:
            return text
        cut = text.rfind(" ", 0, length)
        return text[: cut if cut > 0 else length] + "…"
