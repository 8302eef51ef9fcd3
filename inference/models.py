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

    def local_dir(self):
        """The PEFT directory to load. An adapter replicated from a peer has only its blob: it is
        unpacked (verified against its CID) under ADAPTER_DIR on first use."""
        if self.path:
            return self.path
        if not self.blob_cid:
            raise FileNotFoundError(f"adapter {self} has neither a local path nor a blob")
        from pathlib import Path

        from mining import blobstore
        from mining.training import unpack_to_dir

        target = Path(settings.ADAPTER_DIR) / "from-blobs" / f"{self.expert}-v{self.version}-{self.blob_cid[-16:]}"
        if not (target / "adapter_model.safetensors").is_file():
            unpack_to_dir(blobstore.read_bytes(self.blob_cid), target)
        return str(target)

    def approve(self):
        self.status = self.Status.APPROVED
        self.approved_at = timezone.now()
        self.retired_at = None
        self.save(update_fields=["status", "approved_at", "retired_at"])

    def retire(self):
        self.status = self.Status.RETIRED
        self.retired_at = timezone.now()
        self.save(update_fields=["status", "retired_at"])


class Conversation(models.Model):
    """A playground chat owned by one user; its messages form the history sent to the model."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=120, default="New chat")
    options = models.JSONField(default=dict, blank=True, help_text="Last advanced options used")
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-updated"]

    def __str__(self):
        return self.title

    @classmethod
    def for_user(cls, user, pk):
        """The user's conversation `pk`, or None (someone else's id reads as not found)."""
        return cls.objects.filter(owner=user, pk=pk).first()

    def visible_messages(self):
        """The thread as shown: every user message and the current (newest) version of each answer."""
        return [m for m in self.messages.order_by("created", "pk") if m.role == Message.Role.USER or m.is_current]

    def history(self, upto=None):
        """[{role, content}] for the model: the visible thread (optionally only up to a message)."""
        out = []
        for message in self.visible_messages():
            if upto is not None and message.pk == upto.pk:
                out.append(message.as_chat())
                break
            if message.role == Message.Role.ASSISTANT and not message.content:
                continue
            out.append(message.as_chat())
        return out

    def expire_stale_answers(self, older_than):
        """Answers left "streaming" by a web process that died mid-answer become errors."""
        self.messages.filter(status=Message.Status.STREAMING, created__lt=timezone.now() - older_than).update(
            status=Message.Status.ERROR, error="interrupted: the server restarted before the answer finished")

    def last_user_message(self):
        return self.messages.filter(role=Message.Role.USER).order_by("-created", "-pk").first()

    def touch(self):
        self.updated = timezone.now()
        self.save(update_fields=["updated"])

    def rename(self, title):
        self.title = title.strip()[:120] or "New chat"
        self.save(update_fields=["title"])


class Message(models.Model):
    """A user prompt or a model answer. Regenerating adds a new answer to the same prompt (the old
    versions stay, `is_current` marks the one shown); answers carry the generation metadata."""

    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming"
        DONE = "done"
        STOPPED = "stopped"
        ERROR = "error"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField(blank=True)
    reply_to = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="answers")
    version = models.PositiveIntegerField(default=1)
    is_current = models.BooleanField(default=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DONE)
    error = models.CharField(max_length=500, blank=True)
    options = models.JSONField(default=dict, blank=True)
    experts = models.JSONField(default=dict, blank=True, help_text="{expert: weight} used for this answer")
    sources = models.JSONField(default=list, blank=True)
    metrics = models.JSONField(default=dict, blank=True, help_text="tokens, ttft_ms, tokens_per_s, backend, ...")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created", "pk"]

    def __str__(self):
        return f"{self.role}: {self.content[:40]}"

    def as_chat(self):
        return {"role": self.role, "content": self.content}

    def versions(self):
        if self.reply_to_id is None:
            return [self]
        return list(Message.objects.filter(reply_to_id=self.reply_to_id).order_by("version"))

    def finish(self, status, content, *, experts=None, sources=None, metrics=None, error=""):
        self.status = status
        self.content = content
        self.experts = experts or {}
        self.sources = sources or []
        self.metrics = metrics or {}
        self.error = error[:500]
        self.save(update_fields=["status", "content", "experts", "sources", "metrics", "error"])


class Feedback(models.Model):
    """A user's verdict on one answer: thumbs up/down and optionally the corrected answer."""

    class Rating(models.IntegerChoices):
        UP = 1
        DOWN = -1

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="feedback")
    rating = models.SmallIntegerField(choices=Rating.choices)
    correction = models.TextField(blank=True)
    expert = models.SlugField(max_length=40, blank=True, help_text="Expert the answer came from (its top weight)")
    created = models.DateTimeField(default=timezone.now)
    exported_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        constraints = [models.UniqueConstraint(fields=["message", "user"], name="one_feedback_per_user_message")]

    def __str__(self):
        return f"{self.get_rating_display()} on message {self.message_id}"

    @classmethod
    def record(cls, user, message, rating, correction=""):
        """Stores (or replaces) the user's verdict on an answer; the expert is the answer's top one."""
        expert = max(message.experts, key=message.experts.get) if message.experts else "general"
        feedback, _ = cls.objects.update_or_create(
            message=message, user=user,
            defaults={"rating": rating, "correction": correction, "expert": expert, "created": timezone.now(),
                      "exported_at": None})
        return feedback

    def training_example(self):
        """The JSONL record for expert training, or None when this feedback teaches nothing
        (a thumbs-down without a correction)."""
        answer = self.correction.strip() or (self.message.content if self.rating == self.Rating.UP else "")
        if not answer:
            return None
        prompt = self.message.conversation.history(upto=self.message.reply_to) if self.message.reply_to_id else []
        return {
            "messages": prompt + [{"role": "assistant", "content": answer}],
            "source": "correction" if self.correction.strip() else "thumbs_up",
            "expert": self.expert,
            "feedback_id": self.pk,
        }

    @classmethod
    def export_jsonl(cls, out, expert=None, queryset=None):
        """Writes corrections and thumbs-up answers (optionally only one expert's) as JSONL lines;
        returns how many were written and marks them exported."""
        import json

        rows = (queryset if queryset is not None else cls.objects).select_related("message__conversation")
        rows = rows.order_by("created", "pk")
        if expert:
            rows = rows.filter(expert=expert)
        written = []
        for feedback in rows:
            example = feedback.training_example()
            if example is not None:
                out.write(json.dumps(example, ensure_ascii=False) + "\n")
                written.append(feedback.pk)
        cls.objects.filter(pk__in=written).update(exported_at=timezone.now())
        return len(written)
