import io

from django.contrib import admin
from django.http import HttpResponse

from .models import Adapter, Conversation, Feedback, Message


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


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("role", "content", "version", "is_current", "status", "experts")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("title", "owner", "created", "updated")
    search_fields = ("title", "owner__username")
    inlines = [MessageInline]


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    list_display = ("message", "user", "rating", "expert", "has_correction", "created", "exported_at")
    list_filter = ("rating", "expert", "exported_at")
    search_fields = ("correction", "message__content")
    readonly_fields = ("message", "user", "created", "exported_at")
    actions = ["export_jsonl"]

    @admin.display(boolean=True)
    def has_correction(self, feedback):
        return bool(feedback.correction)

    @admin.action(description="Export selected as a JSONL training set")
    def export_jsonl(self, request, queryset):
        out = io.StringIO()
        count = Feedback.export_jsonl(out, queryset=queryset)
        response = HttpResponse(out.getvalue(), content_type="application/x-ndjson")
        response["Content-Disposition"] = 'attachment; filename="feedback.jsonl"'
        self.message_user(request, f"{count} examples exported")
        return response
