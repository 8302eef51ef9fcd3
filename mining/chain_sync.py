"""Chain sync: replicate peers' ledgers, verify them, apply what they announce.

For each enabled peer: page through `GET <peer>/api/chain/blocks?from=<our last height + 1>`,
check every block (shape, height, link to the previous stored block, transaction hashes, Merkle
root, signature by the peer's *configured* public key), fetch the blobs its announcements
reference from `GET <peer>/api/blobs/<cid>` (verified against the CID while streaming into the
blob store), then store the block and apply its announcements in one database transaction.

The first bad block stops the run: it is reported (Peer.last_error, log, metric) and nothing from
it is stored or applied; the blocks before it stay. Network I/O never happens inside a database
transaction. A Redis lock (with a TTL, so a killed worker cannot leave it stuck) keeps two sync
runs off one peer; the unique (origin, height) constraint backs it up.
"""

import json
import logging
from dataclasses import dataclass

import requests
from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone

from r3mes_site import metrics

from . import blobstore, ledger
from .models import Block, Dataset, Peer, Transaction

log = logging.getLogger(__name__)


class SyncError(Exception):
    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


@dataclass
class SyncResult:
    peer: str
    accepted: int
    height: int
    error: str = ""
    skipped: bool = False

    def summary(self):
        if self.skipped:
            return f"{self.peer}: skipped ({self.error})"
        text = f"{self.peer}: {self.accepted} new block(s), height {self.height}"
        return f"{text}; ERROR: {self.error}" if self.error else text


# --- Announcements: tx type -> (payload validator returning blob CIDs, applier) -------------------


def _require(payload, fields):
    for name, kind in fields.items():
        value = payload.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"field {name!r} is missing or not {getattr(kind, '__name__', kind)}")


def _checked_cid(payload):
    try:
        blobstore.digest_from_cid(payload["blob_cid"])
    except blobstore.InvalidCid as exc:
        raise ValueError(str(exc)) from None
    return [payload["blob_cid"]]


def check_adapter_announcement(payload):
    _require(payload, {"expert": str, "version": int, "blob_cid": str, "sha256": str, "rank": int,
                       "alpha": (int, float), "target_modules": list, "size_bytes": int})
    return _checked_cid(payload)


def apply_adapter_approved(peer, payload):
    from inference.models import Adapter

    existing = Adapter.objects.filter(expert=payload["expert"], blob_cid=payload["blob_cid"]).first()
    if existing:
        # This node's own decision wins: an adapter retired here stays retired.
        if existing.status == Adapter.Status.CANDIDATE:
            existing.approve()
        return
    metrics = dict(payload.get("metrics") or {})
    metrics["origin"] = {"peer": peer.name, "version": payload["version"]}
    # Versions are per node: the peer's "v3" may be this node's v1, so the origin is kept.
    Adapter.objects.create(
        expert=payload["expert"],
        version=Adapter.next_version(payload["expert"]),
        blob_cid=payload["blob_cid"],
        sha256=payload["sha256"],
        base_model=str(payload.get("base_model", ""))[:200],
        rank=payload["rank"],
        alpha=payload["alpha"],
        target_modules=payload["target_modules"],
        size_bytes=payload["size_bytes"],
        metrics=metrics,
        status=Adapter.Status.APPROVED,
        approved_at=timezone.now(),
    )


def check_dataset_announcement(payload):
    # `format` and `size_bytes` may be missing (older payloads): they are then read off the blob.
    _require(payload, {"name": str, "expert": str, "blob_cid": str, "sha256": str})
    if "format" in payload and payload["format"] not in Dataset.Format.values:
        raise ValueError(f"format {payload['format']!r} is not one of {', '.join(Dataset.Format.values)}")
    for name in ("size_bytes", "examples"):
        if name in payload and (not isinstance(payload[name], int) or isinstance(payload[name], bool) or payload[name] < 0):
            raise ValueError(f"field {name!r} must be a non-negative integer")
    cids = _checked_cid(payload)
    if blobstore.sha256_hex_from_cid(payload["blob_cid"]) != payload["sha256"]:
        raise ValueError("sha256 does not match the blob CID")
    return cids


def _guess_format(cid):
    """jsonl when the first non-empty line of the (verified) blob is a JSON object, else text."""
    for line in blobstore.read_bytes(cid).splitlines():
        if line.strip():
            try:
                return Dataset.Format.JSONL if isinstance(json.loads(line), dict) else Dataset.Format.TEXT
            except ValueError:
                return Dataset.Format.TEXT
    return Dataset.Format.TEXT


def apply_dataset_approved(peer, payload):
    existing = Dataset.objects.filter(blob_cid=payload["blob_cid"]).first()
    if existing:
        # This node's own decision wins: a dataset rejected here stays rejected.
        if existing.status == Dataset.Status.PENDING:
            existing.approve()
        return
    Dataset.objects.create(
        name=payload["name"][:200],
        expert=payload["expert"][:40],
        format=payload.get("format") or _guess_format(payload["blob_cid"]),
        blob_cid=payload["blob_cid"],
        sha256=payload["sha256"],
        size_bytes=payload.get("size_bytes") or blobstore.path_for(payload["blob_cid"]).stat().st_size,
        examples=payload.get("examples", 0),
        description=f"Replicated from peer {peer.name}. " + str(payload.get("description", "")),
        status=Dataset.Status.APPROVED,
        approved_at=timezone.now(),
    )


APPLIERS = {
    "adapter_approved": (check_adapter_announcement, apply_adapter_approved),
    "dataset_approved": (check_dataset_announcement, apply_dataset_approved),
}


# --- HTTP ---------------------------------------------------------------------------------------


def _timeout():
    return (settings.R3MES_PEER_CONNECT_TIMEOUT, settings.R3MES_PEER_READ_TIMEOUT)


def _get(peer, path, **kwargs):
    url = peer.endpoint(path)
    try:
        response = requests.get(url, timeout=_timeout(), **kwargs)
    except requests.Timeout:
        raise SyncError(f"peer {peer.name} did not answer within {settings.R3MES_PEER_READ_TIMEOUT:g} s ({url})", "timeout") from None
    except requests.ConnectionError as exc:
        raise SyncError(f"peer {peer.name} is unreachable at {url}: {_root_cause(exc)}", "unreachable") from None
    except requests.RequestException as exc:
        raise SyncError(f"request to peer {peer.name} failed ({url}): {exc}", "unreachable") from None
    if response.status_code != 200:
        detail = response.text[:200].strip()
        response.close()
        raise SyncError(f"peer {peer.name} answered HTTP {response.status_code} for {url}: {detail}", "http_status")
    return response


def _root_cause(exc):
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    return str(exc) or type(exc).__name__


def _get_json(peer, path, params):
    response = _get(peer, path, params=params, stream=True)
    limit = settings.R3MES_PEER_MAX_PAGE_BYTES
    body = bytearray()
    try:
        for chunk in response.iter_content(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise SyncError(f"peer {peer.name} sent more than {limit} bytes for one page of blocks", "garbage")
    except requests.RequestException as exc:
        raise SyncError(f"peer {peer.name} broke off the answer: {exc}", "unreachable") from None
    finally:
        response.close()
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SyncError(f"peer {peer.name} answered something that is not JSON: {bytes(body[:80])!r}", "garbage") from None


def fetch_blocks(peer, start, limit):
    data = _get_json(peer, "/api/chain/blocks", {"from": start, "limit": limit})
    if not isinstance(data, dict) or not isinstance(data.get("blocks"), list):
        raise SyncError(f"peer {peer.name} answered JSON without a 'blocks' list", "garbage")
    return data["blocks"]


def fetch_blob(peer, cid):
    """Makes sure the blob store holds a verified copy of `cid`, fetching it from the peer."""
    if blobstore.exists(cid):
        try:
            blobstore.verify(cid)
            return
        except blobstore.CorruptBlob:
            log.warning("local copy of blob %s is corrupt; fetching it again from %s", cid, peer.name)
    response = _get(peer, f"/api/blobs/{cid}", stream=True)
    limit = settings.R3MES_PEER_MAX_BLOB_BYTES
    counted = 0

    def chunks():
        nonlocal counted
        for chunk in response.iter_content(blobstore.CHUNK):
            counted += len(chunk)
            if counted > limit:
                raise SyncError(f"blob {cid} from peer {peer.name} is larger than {limit} bytes", "garbage")
            yield chunk

    try:
        blobstore.put_stream(chunks(), expected_cid=cid)
    except blobstore.CorruptBlob as exc:
        metrics.corrupt_blobs.labels("peer").inc()
        raise SyncError(f"blob {cid} from peer {peer.name} was refused: {exc}", "corrupt_blob") from None
    except requests.RequestException as exc:
        raise SyncError(f"peer {peer.name} broke off blob {cid}: {exc}", "unreachable") from None
    finally:
        response.close()
    metrics.chain_sync_blob_bytes.inc(counted)


# --- Sync ---------------------------------------------------------------------------------------


def _announcements(peer, block):
    """[(applier, payload)] for the block's transactions this node applies; validates payloads."""
    found = []
    if not peer.apply_announcements:
        return found
    for i, tx in enumerate(block["transactions"]):
        entry = APPLIERS.get(tx["type"])
        if entry is None:
            continue
        check, apply = entry
        try:
            cids = check(tx["payload"])
        except ValueError as exc:
            raise SyncError(f"block {block['height']} transaction {i} ({tx['type']}): {exc}", "bad_announcement") from None
        found.append((apply, tx["payload"], cids))
    return found


def _store(peer, block, announcements):
    with transaction.atomic():
        stored = Block.objects.create(
            origin=peer,
            **{k: block[k] for k in ("height", "hash", "previous_hash", "merkle_root", "timestamp", "proposer", "signature", "tx_count")},
        )
        Transaction.objects.bulk_create(
            Transaction(block=stored, index=i, tx_type=tx["type"], payload=tx["payload"], timestamp=tx["timestamp"], hash=tx["hash"])
            for i, tx in enumerate(block["transactions"])
        )
        for apply, payload, _ in announcements:
            apply(peer, payload)
        claimed = Peer.objects.filter(pk=peer.pk, last_height=block["height"] - 1).update(last_height=block["height"])
        if claimed != 1:
            raise IntegrityError(f"peer {peer.name} moved past height {block['height'] - 1} during this sync")
    peer.last_height = block["height"]


def sync_peer(peer, *, limit=None):
    """Pulls, verifies, stores and applies the peer's new blocks; returns a SyncResult. Errors
    are reported on the peer (last_error), logged and counted, never raised."""
    limit = limit or settings.R3MES_CHAIN_SYNC_PAGE
    lock = f"r3mes:chain-sync:{peer.pk}"
    if not cache.add(lock, "1", timeout=settings.R3MES_CHAIN_SYNC_LOCK_S):
        return SyncResult(peer.name, 0, peer.last_height, error="another sync of this peer is running", skipped=True)
    accepted = 0
    try:
        peer.refresh_from_db()
        top = peer.head()
        if (top.height if top else 0) != peer.last_height:  # keep the counter honest
            Peer.objects.filter(pk=peer.pk).update(last_height=top.height if top else 0)
            peer.last_height = top.height if top else 0
        previous = top.hash if top else ledger.GENESIS_PREVIOUS_HASH
        while True:
            blocks = fetch_blocks(peer, peer.last_height + 1, limit)
            for block in blocks:
                height = peer.last_height + 1
                try:
                    ledger.check_block(block, height=height, previous_hash=previous, public_key=peer.public_key)
                except ledger.InvalidBlock as exc:
                    raise SyncError(f"block {height} from peer {peer.name} was refused: {exc}", "invalid_block") from None
                announcements = _announcements(peer, block)
                for _, _, cids in announcements:
                    for cid in cids:
                        fetch_blob(peer, cid)
                try:
                    _store(peer, block, announcements)
                except IntegrityError as exc:
                    raise SyncError(f"block {height} from peer {peer.name} could not be stored: {exc}", "conflict") from None
                previous = block["hash"]
                accepted += 1
                metrics.chain_sync_blocks.inc()
            if len(blocks) < limit:
                break
    except SyncError as exc:
        log.warning("chain sync with %s stopped: %s", peer.name, exc)
        metrics.chain_sync_failures.labels(exc.reason).inc()
        peer.record_error(str(exc))
        return SyncResult(peer.name, accepted, peer.last_height, error=str(exc))
    finally:
        cache.delete(lock)
    peer.record_success()
    if accepted:
        log.info("chain sync with %s: %d new block(s), height %d", peer.name, accepted, peer.last_height)
    return SyncResult(peer.name, accepted, peer.last_height)


def sync_all():
    return [sync_peer(peer) for peer in Peer.objects.filter(enabled=True)]
