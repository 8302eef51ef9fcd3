from django.conf import settings
from django.db import models, transaction
from django.utils import timezone


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

    def activate(self):
        """Makes this the active backbone; the one it replaces becomes available again and is
        remembered in `previous`, so an upgrade can be rolled back by activating it."""
        with transaction.atomic():
            current = (
                type(self).objects.select_for_update().filter(status=self.Status.ACTIVE).exclude(pk=self.pk).first()
            )
            type(self).objects.filter(status=self.Status.ACTIVE).exclude(pk=self.pk).update(
                status=self.Status.AVAILABLE
            )
            if current is not None:
                self.previous = current
            self.status = self.Status.ACTIVE
            self.activated_at = timezone.now()
            self.save(update_fields=["previous", "status", "activated_at"])
