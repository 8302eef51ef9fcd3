from django.urls import path

from . import views

urlpatterns = [
    path("documents/", views.documents, name="documents"),
    path("documents/collections/<int:collection_id>/upload", views.upload, name="document-upload"),
    path("documents/<int:document_id>/", views.document_detail, name="document-detail"),
    path("documents/<int:document_id>/status", views.document_status, name="document-status"),
    path("documents/<int:document_id>/delete", views.document_delete, name="document-delete"),
    path("api/rag/collections", views.api_collections, name="api-rag-collections"),
    path("api/rag/documents", views.api_documents, name="api-rag-documents"),
    path("api/rag/documents/<int:document_id>", views.api_document, name="api-rag-document"),
    path("api/rag/search", views.api_search, name="api-rag-search"),
]
