from django.contrib import admin

from .models import Dataset, MinerScore, ModelVersion, Round, Submission


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("name", "expert", "format", "examples", "status", "uploaded_by", "created")
    list_filter = ("status", "format", "expert")
    search_fields = ("name", "expert", "sha256", "blob_cid")


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ("name", "architecture", "status", "size_bytes", "created", "activated_at")
    list_filter = ("status", "architecture")
    search_fields = ("name", "file_name", "sha256")


class SubmissionInline(admin.TabularInline):
    model = Submission
    extra = 0
    fields = ("shard", "miner_name", "examples", "eval_loss", "status", "reason", "blob_cid")
    readonly_fields = fields
    can_delete = False


@admin.register(Round)
class RoundAdmin(admin.ModelAdmin):
    list_display = ("id", "expert", "dataset", "shards", "method", "status", "result", "created")
    list_filter = ("status", "method", "expert")
    readonly_fields = ("merkle_root", "report", "base_cid", "baseline_eval_loss", "result", "error")
    inlines = [SubmissionInline]


@admin.register(Submission)
class SubmissionAdmin(admin.ModelAdmin):
    list_display = ("round", "shard", "miner_name", "examples", "eval_loss", "status", "created")
    list_filter = ("status",)
    search_fields = ("miner_name", "blob_cid", "sha256")


@admin.register(MinerScore)
class MinerScoreAdmin(admin.ModelAdmin):
    list_display = ("miner_name", "accepted", "rejected", "ema_improvement", "rounds", "updated")
    search_fields = ("miner_name", "miner_key")


# --- Ledger, peers and model versions ---

from django.db import models  # noqa: E402

from .models import BackboneFetch, Block, Peer, Transaction  # noqa: E402


@admin.register(Peer)
class PeerAdmin(admin.ModelAdmin):
    list_display = ("name", "url", "enabled", "apply_announcements", "last_height", "last_sync_at", "last_error")
    list_filter = ("enabled",)
    search_fields = ("name", "url", "public_key")
    readonly_fields = ("last_height", "last_error", "last_sync_at", "last_success_at", "created")
    actions = ["sync_now"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    @admin.action(description="Sync the selected peers now")
    def sync_now(self, request, queryset):
        from django.contrib import messages

        from .chain_sync import sync_peer

        for peer in queryset:
            result = sync_peer(peer)
            self.message_user(request, result.summary(), messages.ERROR if result.error else messages.SUCCESS)


class TransactionInline(admin.TabularInline):
    model = Transaction
    extra = 0
    can_delete = False
    readonly_fields = ("index", "tx_type", "payload", "timestamp", "hash")

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Block)
class BlockAdmin(admin.ModelAdmin):
    """Read-only: blocks are only written by the ledger and chain sync."""

    list_display = ("height", "origin", "tx_count", "hash", "timestamp")
    list_filter = ("origin",)
    search_fields = ("hash",)
    inlines = [TransactionInline]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(BackboneFetch)
class BackboneFetchAdmin(admin.ModelAdmin):
    list_display = ("version", "state", "source", "bytes_done", "updated")
    readonly_fields = ("version", "state", "source", "error", "bytes_done", "updated")

    def has_add_permission(self, request):
        return False


@admin.action(description="Fetch and verify the selected versions (background)")
def fetch_versions(modeladmin, request, queryset):
    from django.contrib import messages

    from .model_versions import queue_fetch

    queued = sum(1 for version in queryset if queue_fetch(version.pk))
    if queued < queryset.count():
        modeladmin.message_user(request, "The task queue is unreachable; run `r3mes model fetch` on the node", messages.ERROR)
    if queued:
        modeladmin.message_user(request, f"Queued {queued} fetch(es); the Model versions page shows progress", messages.SUCCESS)


@admin.action(description="Activate the selected version (must be fetched)")
def activate_version(modeladmin, request, queryset):
    from django.contrib import messages

    from . import model_versions

    if queryset.count() != 1:
        modeladmin.message_user(request, "Select exactly one version to activate", messages.ERROR)
        return
    try:
        version = model_versions.activate(queryset.get())
    except model_versions.ActivationError as exc:
        modeladmin.message_user(request, str(exc), messages.ERROR)
    else:
        modeladmin.message_user(request, f"{version.name} is now the active backbone", messages.SUCCESS)


@admin.action(description="Roll back to the version the active one replaced")
def rollback_version(modeladmin, request, queryset):
    from django.contrib import messages

    from . import model_versions

    try:
        version = model_versions.rollback()
    except model_versions.ActivationError as exc:
        modeladmin.message_user(request, str(exc), messages.ERROR)
    else:
        modeladmin.message_user(request, f"Rolled back to {version.name}", messages.SUCCESS)


# Operators' actions on the shared ModelVersion admin (registered above).
ModelVersionAdmin.actions = [fetch_versions, activate_version, rollback_version]
