from django.contrib import admin

from .models import Dataset, ModelVersion


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
