from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from r3mes_site.api import ApiError, api_token_required, api_view, parse_json, rate_limited

from . import actions
from .forms import CollectionForm
from .models import Collection, Document
from .retrieval import retrieve


def access_collection(user, collection_id):
    """The collection if `user` may read it; otherwise 404 (a private collection's existence is
    not revealed to others)."""
    collection = Collection.readable_by(user).filter(pk=collection_id).first()
    if collection is None:
        raise Http404("No such collection")
    return collection


def access_document(user, document_id):
    document = Document.objects.select_related("collection").filter(
        pk=document_id, collection__in=Collection.readable_by(user)
    ).first()
    if document is None:
        raise Http404("No such document")
    return document


def check_request_size(request):
    """Refuses an oversized upload from its Content-Length, before Django spools it to disk."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    limit = settings.R3MES_MAX_UPLOAD_BYTES
    if length > limit + 64 * 1024:  # room for the multipart envelope
        raise actions.UploadError(413, f"The upload is {length} bytes; the limit is {limit} bytes per file")


# --- Pages ---------------------------------------------------------------------------------------


@login_required
def documents(request):
    collections = Collection.readable_by(request.user).select_related("owner")
    selected = None
    if request.GET.get("collection"):
        try:
            selected = access_collection(request.user, int(request.GET["collection"]))
        except ValueError:
            raise Http404("No such collection") from None
    elif collections:
        selected = next((c for c in collections if c.owner_id == request.user.pk), collections[0])
    form = CollectionForm(owner=request.user)
    if request.method == "POST":
        form = CollectionForm(request.POST, owner=request.user)
        if form.is_valid():
            collection = form.save()
            messages.success(request, f"Collection “{collection.name}” created.")
            return redirect(f"{request.path}?collection={collection.pk}")
    context = {
        "collections": collections,
        "selected": selected,
        "documents": selected.documents.select_related("uploaded_by") if selected else [],
        "can_write": bool(selected and selected.can_write(request.user)),
        "form": form,
        "max_upload_bytes": settings.R3MES_MAX_UPLOAD_BYTES,
    }
    return render(request, "rag/documents.html", context)


@login_required
@require_POST
def upload(request, collection_id):
    """One file per request (the page sends each dropped file on its own, so each gets its own
    progress bar); answers with the document's row, or an error row with a 4xx status."""
    collection = access_collection(request.user, collection_id)
    try:
        check_request_size(request)
    except actions.UploadError as exc:
        return render(request, "rag/partials/upload_error.html", {"name": "(upload)", "error": exc.message}, status=exc.status)
    uploaded = request.FILES.get("file")
    name = uploaded.name if uploaded else "(no file)"
    try:
        if uploaded is None:
            raise actions.UploadError(400, "Choose a file to upload")
        document, created = actions.add_document(collection, request.user, uploaded)
    except PermissionDenied as exc:
        return render(request, "rag/partials/upload_error.html", {"name": name, "error": str(exc)}, status=403)
    except actions.UploadError as exc:
        return render(request, "rag/partials/upload_error.html", {"name": name, "error": exc.message}, status=exc.status)
    context = {"document": document, "duplicate": not created, "can_write": True}
    return render(request, "rag/partials/document_row.html", context, status=201 if created else 200)


@login_required
@require_GET
def document_status(request, document_id):
    document = access_document(request.user, document_id)
    context = {"document": document, "can_write": document.can_delete(request.user)}
    return render(request, "rag/partials/document_row.html", context)


@login_required
def document_detail(request, document_id):
    document = access_document(request.user, document_id)
    if document.is_expired():
        raise Http404("This document has expired")
    chunks = document.chunks.only("id", "ordinal", "page", "text", "char_start", "char_end")
    return render(request, "rag/document_detail.html", {
        "document": document, "chunks": chunks, "can_delete": document.can_delete(request.user),
    })


@login_required
@require_POST
def document_delete(request, document_id):
    document = access_document(request.user, document_id)
    if not document.can_delete(request.user):
        raise PermissionDenied("Only the uploader or the collection's owner can delete this document")
    collection_id = document.collection_id
    actions.delete_document(document)
    if request.headers.get("HX-Request"):
        return HttpResponse("")
    messages.info(request, f"Deleted “{document.original_name}”.")
    return redirect(f"/documents/?collection={collection_id}")


# --- JSON API ------------------------------------------------------------------------------------


def collection_json(collection, user):
    return {
        "id": collection.pk, "name": collection.name, "kind": collection.kind, "visibility": collection.visibility,
        "owner": collection.owner.username, "writable": collection.can_write(user),
        "news_ttl_days": collection.news_ttl_days, "documents": collection.documents.count(),
    }


def document_json(document):
    return {
        "id": document.pk, "collection": document.collection_id, "name": document.original_name,
        "content_type": document.content_type, "size": document.size, "sha256": document.sha256,
        "status": document.status, "progress": document.progress, "chunks": document.chunk_count,
        "pages": document.pages, "error": document.error or None, "created": document.created.isoformat(),
        "expires": document.expires.isoformat() if document.expires else None,
    }


@api_view(["GET", "POST"])
@api_token_required
@rate_limited("api", "R3MES_RATE_API")
def api_collections(request):
    if request.method == "GET":
        collections = Collection.readable_by(request.user).select_related("owner")
        return JsonResponse({"data": [collection_json(c, request.user) for c in collections]})
    body = parse_json(request)
    if isinstance(body.get("shared_with"), list):
        body["shared_with"] = ",".join(str(name) for name in body["shared_with"])
    form = CollectionForm(body, owner=request.user)
    if not form.is_valid():
        field, errors = next(iter(form.errors.items()))
        raise ApiError(400, f"{field}: {' '.join(errors)}" if field != "__all__" else " ".join(errors), param=field)
    with transaction.atomic():
        collection = form.save()
    return JsonResponse({"id": collection.pk, **collection_json(collection, request.user)}, status=201)


@api_view(["POST"])
@api_token_required
@rate_limited("api", "R3MES_RATE_API")
def api_documents(request):
    try:
        check_request_size(request)
    except actions.UploadError as exc:
        raise ApiError(exc.status, exc.message, param="file") from None
    uploaded = request.FILES.get("file")
    if uploaded is None:
        raise ApiError(400, "Send the document as multipart/form-data field 'file'", param="file")
    try:
        collection = access_collection(request.user, int(request.POST.get("collection", "")))
    except (ValueError, Http404):
        raise ApiError(404, "Collection not found (or you cannot read it)", param="collection") from None
    try:
        document, created = actions.add_document(collection, request.user, uploaded)
    except PermissionDenied as exc:
        raise ApiError(403, str(exc), param="collection") from None
    except actions.UploadError as exc:
        raise ApiError(exc.status, exc.message, param="file") from None
    return JsonResponse({"id": document.pk, "status": document.status, "duplicate": not created},
                        status=202 if created else 200)


@api_view(["GET", "DELETE"])
@api_token_required
@rate_limited("api", "R3MES_RATE_API")
def api_document(request, document_id):
    try:
        document = access_document(request.user, document_id)
    except Http404:
        raise ApiError(404, f"Document {document_id} not found") from None
    if request.method == "DELETE":
        if not document.can_delete(request.user):
            raise ApiError(403, "Only the uploader or the collection's owner can delete this document")
        actions.delete_document(document)
        return JsonResponse({"id": document_id, "deleted": True})
    return JsonResponse(document_json(document))


@api_view(["POST"])
@api_token_required
@rate_limited("api", "R3MES_RATE_API")
def api_search(request):
    body = parse_json(request)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, "'query' must be a non-empty string", param="query")
    if len(query) > 2000:
        raise ApiError(400, "'query' must be at most 2000 characters", param="query")
    collections = body.get("collections")
    if collections is not None and not (isinstance(collections, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in collections)):
        raise ApiError(400, "'collections' must be a list of collection ids", param="collections")
    top_k = body.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 50:
        raise ApiError(400, "'top_k' must be an integer from 1 to 50", param="top_k")
    threshold = body.get("threshold")
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1 <= threshold <= 1):
        raise ApiError(400, "'threshold' must be a number from -1 to 1 (cosine similarity)", param="threshold")
    try:
        results = retrieve(query, request.user, collections=collections, top_k=top_k, threshold=threshold)
    except PermissionDenied as exc:
        raise ApiError(404, str(exc), param="collections") from None
    return JsonResponse({"query": query, "data": [result.as_dict() for result in results]})
