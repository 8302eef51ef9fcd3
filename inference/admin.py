from django.contrib import admin

from .models import Adapter


@admin.register(Adapter)
class AdapterAdmin(admin.ModelAdmin):
    list_display = ("expert", "version", "status", "rank", "alpha", "size_bytes", "created", "approved_at")
    list_filter = ("status", "expert")
    search_fields = ("expert", "sha256", "blob_cid")
    readonly_fields = ("created", "approved_at", "retired_at")
    actions = ["approve", "retire"]

    @admin.action(description="Approve (make servable)")
    def approve(self, request, queryset):
        for adapter in queryset:
            adapter.approve()

    @admin.action(description="Retire")
    def retire(self, request, queryset):
        for adapter in queryset:
            adapter.retire()
