from django.contrib import admin, messages

from . import actions, index
from .models import Chunk, Collection, Document


@admin.register(Collection)
class CollectionAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "owner", "visibility", "news_ttl_days", "created")
    list_filter = ("kind", "visibility")
    search_fields = ("name", "owner__username")
    filter_horizontal = ("shared_with",)
    actions = ["rebuild_index", "purge_documents"]

    @admin.action(description="Rebuild the search index from the stored passages")
    def rebuild_index(self, request, queryset):
        for collection in queryset:
            with index.lock(collection.pk):
                loaded = index.rebuild(collection.pk)
            self.message_user(request, f"{collection}: index version {loaded.version}, {loaded.size} vectors")

    @admin.action(description="Purge all documents (files, passages and vectors)")
    def purge_documents(self, request, queryset):
        count = 0
        for collection in queryset:
            for document in collection.documents.all():
                actions.delete_document(document)
                count += 1
        self.message_user(request, f"Purged {count} documents", messages.SUCCESS)

    def delete_queryset(self, request, queryset):
        for collection in queryset:
            actions.delete_collection(collection)

    def delete_model(self, request, obj):
        actions.delete_collection(obj)


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ("original_name", "collection", "status", "progress", "chunk_count", "pages", "size", "uploaded_by", "created", "expires")
    list_filter = ("status", "content_type", "collection__kind")
    search_fields = ("original_name", "sha256", "collection__name")
    readonly_fields = ("sha256", "size", "content_type", "pages", "chunk_count", "attempts", "created", "updated")
    actions = ["reingest", "purge"]

    @admin.action(description="Re-ingest selected documents")
    def reingest(self, request, queryset):
        queued = sum(actions.reingest(document) for document in queryset)
        self.message_user(request, f"Queued {queued} documents for ingestion")

    @admin.action(description="Purge selected documents (file, passages and vectors)")
    def purge(self, request, queryset):
        documents = list(queryset)
        for document in documents:
            actions.delete_document(document)
        self.message_user(request, f"Purged {len(documents)} documents", messages.SUCCESS)

    def delete_queryset(self, request, queryset):
        for document in list(queryset):
            actions.delete_document(document)

    def delete_model(self, request, obj):
        actions.delete_document(obj)


@admin.register(Chunk)
class ChunkAdmin(admin.ModelAdmin):
    list_display = ("document", "ordinal", "page", "char_start", "char_end", "tokens")
    search_fields = ("text", "document__original_name")
    readonly_fields = ("vector",)
    list_select_related = ("document",)
