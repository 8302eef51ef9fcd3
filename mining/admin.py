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
