from django.conf import settings
from django.db import models
from django.utils import timezone


class Adapter(models.Model):
    """One version of a DoRA expert adapter (PEFT format) for the active backbone.

    An expert is servable when it has an approved adapter version; governance approves them
    (a passed adapter proposal calls `approve()`), operators can also approve and retire in the admin.
    """

    class Status(models.TextChoices):
        CANDIDATE = "candidate"
        APPROVED = "approved"
        RETIRED = "retired"

    expert = models.SlugField(max_length=40, help_text="Expert id from the registry, e.g. 'coding'")
    version = models.PositiveIntegerField()
    path = models.CharField(max_length=500, blank=True, help_text="Local PEFT adapter directory")
    blob_cid = models.CharField(max_length=100, blank=True, help_text="CID of the packed adapter in the blob store")
    sha256 = models.CharField(max_length=64, help_text="SHA-256 of adapter_model.safetensors")
    base_model = models.CharField(max_length=200, blank=True)
    rank = models.PositiveIntegerField(default=8)
    alpha = models.FloatField(default=16)
    target_modules = models.JSONField(default=list)
    size_bytes = models.PositiveBigIntegerField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.CANDIDATE, db_index=True)
    metrics = models.JSONField(default=dict, blank=True, help_text="e.g. eval loss, training steps")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(default=timezone.now)
    approved_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["expert", "-version"]
        constraints = [models.UniqueConstraint(fields=["expert", "version"], name="unique_adapter_version")]

    def __str__(self):
        return f"{self.expert} v{self.version}"

    @classmethod
    def next_version(cls, expert):
        latest = cls.objects.filter(expert=expert).order_by("-version").values_list("version", flat=True).first()
        return (latest or 0) + 1

    @classmethod
    def servable(cls):
        """The approved version per expert that serves (the newest approved one)."""
        latest = {}
        for adapter in cls.objects.filter(status=cls.Status.APPROVED).order_by("expert", "-version"):
            latest.setdefault(adapter.expert, adapter)
        return latest

    def approve(self):
        self.status = self.Status.APPROVED
        self.approved_at = timezone.now()
        self.retired_at = None
        self.save(update_fields=["status", "approved_at", "retired_at"])

    def retire(self):
        self.status = self.Status.RETIRED
        self.retired_at = timezone.now()
        self.save(update_fields=["status", "retired_at"])
