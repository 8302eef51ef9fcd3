"""Ledger, chain-sync and model-version views: the peer API (blobs, blocks, head, node key) and
the explorer, peers and models pages."""

import functools

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import FileResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from r3mes_site import metrics
from r3mes_site.api import ApiError, api_view, rate_limited

from . import blobstore, keys, ledger, model_versions
from .models import BackboneFetch, Block, ModelVersion, Peer

MAX_BLOCKS_PER_PAGE = 500


# --- Peer API (unauthenticated: the ledger is public and blobs are named by their hash) ---------


@api_view(["GET"])
@rate_limited("peer", "R3MES_RATE_PEER")
def blob(request, cid):
    try:
        # Verified before the first byte goes out: a corrupt blob is reported, never served.
        blobstore.verify(cid)
    except blobstore.InvalidCid as exc:
        raise ApiError(400, str(exc), param="cid", code="invalid_cid") from None
    except blobstore.BlobNotFound:
        raise ApiError(404, f"blob {cid} is not in this node's store", param="cid", code="blob_not_found") from None
    except blobstore.CorruptBlob:
        metrics.corrupt_blobs.labels("serve").inc()
        raise ApiError(503, f"this node's copy of blob {cid} is corrupt and will not be served; try another peer",
                       param="cid", code="corrupt_blob") from None
    response = FileResponse(open(blobstore.path_for(cid), "rb"), content_type="application/octet-stream")
    response["ETag"] = f'"{cid}"'
    response["Cache-Control"] = "public, max-age=31536000, immutable"
    return response


def _int_param(request, name, default, minimum, maximum=None):
    raw = request.GET.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"'{name}' must be an integer, got {raw!r}", param=name) from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ApiError(400, f"'{name}' must be {bound}, got {value}", param=name)
    return value


def _head_dict():
    top = ledger.head()
    if top is None:
        return {"height": 0, "hash": ledger.GENESIS_PREVIOUS_HASH, "timestamp": None}
    return {"height": top.height, "hash": top.hash, "timestamp": top.timestamp}


@api_view(["GET"])
@rate_limited("peer", "R3MES_RATE_PEER")
def chain_blocks(request):
    start = _int_param(request, "from", 1, 1)
    limit = _int_param(request, "limit", 100, 1, MAX_BLOCKS_PER_PAGE)
    blocks = (
        Block.objects.filter(origin__isnull=True, height__gte=start)
        .order_by("height")
        .prefetch_related("transactions")[:limit]
    )
    return JsonResponse({
        "node": keys.node_public_key_hex(),
        "head": _head_dict(),
        "blocks": [block.as_dict() for block in blocks],
    })


@api_view(["GET"])
@rate_limited("peer", "R3MES_RATE_PEER")
def chain_head(request):
    return JsonResponse(_head_dict())


@api_view(["GET"])
@rate_limited("peer", "R3MES_RATE_PEER")
def chain_node(request):
    return JsonResponse({"public_key": keys.node_public_key_hex(), "algorithm": "ed25519", "head": _head_dict()})


# --- Pages --------------------------------------------------------------------------------------


def staff_required(view):
    @functools.wraps(view)
    @login_required
    def wrapper(request, *args, **kwargs):
        if not request.user.is_staff:
            raise PermissionDenied("Only operators (staff) can do this")
        return view(request, *args, **kwargs)

    return wrapper


def _origin(request):
    peer_id = request.GET.get("peer") or request.POST.get("peer")
    if not peer_id:
        return None
    if not str(peer_id).isdigit():
        from django.http import Http404

        raise Http404("No such peer")
    return get_object_or_404(Peer, pk=peer_id)


def _blocks(origin):
    return Block.objects.filter(origin=origin) if origin else Block.objects.filter(origin__isnull=True)


def ledger_page(request):
    origin = _origin(request)
    page = Paginator(_blocks(origin).order_by("-height").prefetch_related("transactions"), 25).get_page(
        request.GET.get("page")
    )
    return render(request, "mining/chain/ledger.html", {
        "origin": origin,
        "page": page,
        "peers": Peer.objects.all(),
        "public_key": origin.public_key if origin else keys.node_public_key_hex(),
        "tx_types": ledger.TX_TYPES,
    })


@require_POST
@login_required
def ledger_verify(request):
    origin = _origin(request)
    report = ledger.verify_chain(origin)
    context = {"report": report, "origin": origin}
    if request.htmx:
        return render(request, "mining/chain/_verify_result.html", context)
    (messages.success if report.ok else messages.error)(request, report.summary())
    url = redirect("mining-ledger").url
    return redirect(f"{url}?peer={origin.pk}" if origin else url)


def block_page(request, height):
    origin = _origin(request)
    block = get_object_or_404(_blocks(origin).prefetch_related("transactions"), height=height)
    return render(request, "mining/chain/block.html", {
        "origin": origin, "chain_block": block,
        "has_next": _blocks(origin).filter(height=height + 1).exists(),
    })


def peers_page(request):
    return render(request, "mining/chain/peers.html", {
        "peers": Peer.objects.all(),
        "node_key": keys.node_public_key_hex(),
        "sync_interval": settings.R3MES_CHAIN_SYNC_INTERVAL,
    })


@require_POST
@staff_required
def peer_sync(request, pk):
    from . import chain_sync

    peer = get_object_or_404(Peer, pk=pk)
    result = chain_sync.sync_peer(peer)
    (messages.error if result.error else messages.success)(request, result.summary())
    return redirect("mining-peers")


def models_page(request):
    versions = list(ModelVersion.objects.all())
    states = {s.version_id: s for s in BackboneFetch.objects.filter(version__in=versions)}
    for version in versions:
        version.fetch_info = states.get(version.pk)
        version.ready = model_versions.is_ready(version)
    active = ModelVersion.active()
    return render(request, "mining/chain/models.html", {
        "versions": versions,
        "active": active,
        "active_path": model_versions.active_backbone_path(),
        "can_rollback": bool(active and active.previous_id),
        "any_running": any(v.fetch_info and v.fetch_info.is_running for v in versions),
    })


@require_POST
@staff_required
def model_fetch(request, pk):
    version = get_object_or_404(ModelVersion, pk=pk)
    state = model_versions.fetch_state(version)
    if state.is_running:
        messages.error(request, f"{version.name} is already being fetched")
    elif model_versions.queue_fetch(version.pk):
        messages.success(request, f"Fetching {version.name} in the background; this page shows its progress")
    else:
        messages.error(request, "The task queue is unreachable; try again, or run `r3mes model fetch` on the node")
    return redirect("mining-models")


@require_POST
@staff_required
def model_activate(request, pk):
    version = get_object_or_404(ModelVersion, pk=pk)
    try:
        model_versions.activate(version)
    except model_versions.ActivationError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{version.name} is now the active backbone; the inference worker reloads it")
    return redirect("mining-models")


@require_POST
@staff_required
def model_rollback(request):
    try:
        target = model_versions.rollback()
    except model_versions.ActivationError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Rolled back to {target.name}")
    return redirect("mining-models")
