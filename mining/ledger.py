"""The node's ledger: transactions in signed, hash-linked blocks.

`record(tx_type, payload)` is the one function other apps call. Block production is immediate:
`record` seals a block holding that transaction inside the caller's database transaction, so

- a ledger entry exists exactly when the change it describes was committed (an outer rollback
  removes both), and nothing waits in a pending pool that a crash could lose or seal twice;
- heights are unique (a conditional unique constraint on the local chain), so two writers can
  never fork it: the loser of a race gets an IntegrityError and retries on the new head.
`record_many` puts several transactions that belong together (e.g. an aggregation and the
submissions it included) in one block.

Formats (all hashes sha256, hex):
- canonical JSON: sorted keys, no whitespace, UTF-8, no NaN/Infinity;
- transaction hash = sha256(canonical {"type", "payload", "timestamp"});
- block header = {"height", "previous_hash", "merkle_root", "timestamp", "proposer", "tx_count"},
  block hash = sha256(canonical header), signature = ed25519(node key, canonical header);
- merkle_root = `mining.merkle.merkle_root` of the transaction hashes in block order;
- the first block has height 1 and previous_hash of 64 zeros.
"""

import datetime
import decimal
import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass

from django.db import IntegrityError, transaction

from r3mes_site import metrics

from . import keys
from .merkle import merkle_root

log = logging.getLogger(__name__)

GENESIS_PREVIOUS_HASH = "0" * 64
TX_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{1,39}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
SIGNATURE_RE = re.compile(r"^[0-9a-f]{128}$")

# What the other apps record (a registry for the explorer's labels; `record` accepts any type
# matching TX_TYPE_RE so a new kind of event needs no change here).
TX_TYPES = {
    "governance_outcome": "A proposal's final tally and result",
    "dataset_approved": "A dataset became minable (blob CID, sha256) — replicated by peers",
    "adapter_approved": "An adapter version became servable (blob CID) — replicated by peers",
    "round_opened": "A training round was opened",
    "submission": "A miner's submission (blob CID, sha256, losses)",
    "aggregation": "A round's aggregation result with the Merkle root of included submissions",
    "backbone_activated": "A backbone version became active",
    "backbone_rolled_back": "The active backbone was rolled back to the previous version",
}


class InvalidBlock(Exception):
    """A block that fails verification; the message names the first problem found."""


class InvalidTransaction(ValueError):
    pass


def _json_default(value):
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def canonical_json(value):
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    ).encode()


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def now_timestamp():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def tx_hash(tx):
    return sha256_hex(canonical_json({"type": tx["type"], "payload": tx["payload"], "timestamp": tx["timestamp"]}))


def header_of(block):
    return {
        "height": block["height"],
        "previous_hash": block["previous_hash"],
        "merkle_root": block["merkle_root"],
        "timestamp": block["timestamp"],
        "proposer": block["proposer"],
        "tx_count": block["tx_count"],
    }


def header_bytes(block):
    return canonical_json(header_of(block))


def make_block(height, previous_hash, bodies, sign, proposer, timestamp=None):
    """A complete block dict from transaction bodies ({"type", "payload", "timestamp"}); `sign`
    maps header bytes to a hex signature. Pure, so tests and benchmarks can build chains too."""
    txs = [{"index": i, **body, "hash": tx_hash(body)} for i, body in enumerate(bodies)]
    block = {
        "height": height,
        "previous_hash": previous_hash,
        "merkle_root": merkle_root([tx["hash"] for tx in txs]),
        "timestamp": timestamp or now_timestamp(),
        "proposer": proposer,
        "tx_count": len(txs),
    }
    data = header_bytes(block)
    block["hash"] = sha256_hex(data)
    block["signature"] = sign(data)
    block["transactions"] = txs
    return block


# --- Verification (shared by `chain verify` and chain sync) ------------------------------------

_BLOCK_FIELDS = {
    "height": int,
    "previous_hash": str,
    "merkle_root": str,
    "timestamp": str,
    "proposer": str,
    "tx_count": int,
    "hash": str,
    "signature": str,
    "transactions": list,
}
_TX_FIELDS = {"type": str, "payload": dict, "timestamp": str, "hash": str}


def _check_shape(block):
    if not isinstance(block, dict):
        raise InvalidBlock(f"a block must be a JSON object, got {type(block).__name__}")
    for field, kind in _BLOCK_FIELDS.items():
        value = block.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidBlock(f"field {field!r} is missing or not a {kind.__name__}")
    for name in ("previous_hash", "merkle_root", "hash", "proposer"):
        if not HEX64_RE.match(block[name]):
            raise InvalidBlock(f"field {name!r} is not 64 lowercase hex characters")
    if not SIGNATURE_RE.match(block["signature"]):
        raise InvalidBlock("field 'signature' is not 128 lowercase hex characters")
    if len(block["timestamp"]) > 40:
        raise InvalidBlock("field 'timestamp' is longer than 40 characters")
    if len(block["transactions"]) != block["tx_count"]:
        raise InvalidBlock(f"tx_count says {block['tx_count']} but the block carries {len(block['transactions'])}")
    for i, tx in enumerate(block["transactions"]):
        if not isinstance(tx, dict):
            raise InvalidBlock(f"transaction {i} is not a JSON object")
        for field, kind in _TX_FIELDS.items():
            if not isinstance(tx.get(field), kind):
                raise InvalidBlock(f"transaction {i}: field {field!r} is missing or not a {kind.__name__}")
        if not HEX64_RE.match(tx["hash"]) or len(tx["timestamp"]) > 40:
            raise InvalidBlock(f"transaction {i}: malformed hash or timestamp")
        if not TX_TYPE_RE.match(tx["type"]):
            raise InvalidBlock(f"transaction {i}: type {tx['type']!r} is not a valid transaction type")
        if tx.get("index", i) != i:
            raise InvalidBlock(f"transaction {i} claims index {tx.get('index')}")


def check_block(block, *, height, previous_hash, public_key):
    """Raises InvalidBlock unless `block` (a dict as served by the API) is well formed, is the
    block at `height` after `previous_hash`, its transactions hash to their hashes and Merkle root,
    and it is signed by `public_key`."""
    _check_shape(block)
    if block["height"] != height:
        raise InvalidBlock(f"expected height {height}, got {block['height']}")
    for i, tx in enumerate(block["transactions"]):
        try:
            computed = tx_hash(tx)
        except (TypeError, ValueError) as exc:
            raise InvalidBlock(f"transaction {i} cannot be hashed: {exc}") from None
        if computed != tx["hash"]:
            raise InvalidBlock(f"transaction {i} was altered: its content hashes to {computed[:16]}…, not {tx['hash'][:16]}…")
    root = merkle_root([tx["hash"] for tx in block["transactions"]])
    if root != block["merkle_root"]:
        raise InvalidBlock(f"wrong Merkle root: the transactions give {root[:16]}…, the header says {block['merkle_root'][:16]}…")
    if block["previous_hash"] != previous_hash:
        raise InvalidBlock(
            f"broken link: previous_hash {block['previous_hash'][:16]}… does not match block {height - 1}'s hash {previous_hash[:16]}…"
        )
    data = header_bytes(block)
    if sha256_hex(data) != block["hash"]:
        raise InvalidBlock("the block hash does not match its header")
    if block["proposer"] != public_key:
        raise InvalidBlock(f"proposed by {block['proposer'][:16]}…, not by the expected key {public_key[:16]}…")
    if not keys.verify_signature(public_key, block["signature"], data):
        raise InvalidBlock("bad signature: the header is not signed by the expected key")


@dataclass
class VerifyReport:
    ok: bool
    blocks: int
    transactions: int
    head_height: int
    first_bad_height: int | None = None
    problem: str = ""

    def summary(self):
        if self.ok:
            return f"OK: {self.blocks} blocks, {self.transactions} transactions verified (head {self.head_height})"
        return f"FAILED at block {self.first_bad_height}: {self.problem} ({self.blocks} blocks before it verified)"


def verify_chain(origin=None):
    """Re-checks every stored block of a chain (this node's when `origin` is None, else the peer's):
    heights, links, transaction hashes, Merkle roots and signatures. Stops at the first bad block."""
    from .models import Block

    if origin is None:
        public_key = keys.node_public_key_hex()
        blocks = Block.objects.filter(origin__isnull=True)
    else:
        public_key = origin.public_key
        blocks = Block.objects.filter(origin=origin)
    previous, count, txs, height = GENESIS_PREVIOUS_HASH, 0, 0, 0
    for block in blocks.order_by("height").prefetch_related("transactions").iterator(chunk_size=500):
        data = block.as_dict()
        try:
            check_block(data, height=height + 1, previous_hash=previous, public_key=public_key)
        except InvalidBlock as exc:
            log.error("ledger verification failed at block %s: %s", block.height, exc)
            return VerifyReport(False, count, txs, height, first_bad_height=block.height, problem=str(exc))
        previous, height = block.hash, block.height
        count += 1
        txs += block.tx_count
    return VerifyReport(True, count, txs, height)


# --- Writing this node's chain ------------------------------------------------------------------


def head(origin=None):
    from .models import Block

    blocks = Block.objects.filter(origin=origin) if origin is not None else Block.objects.filter(origin__isnull=True)
    return blocks.order_by("-height").first()


def _body(tx_type, payload, timestamp):
    if not isinstance(tx_type, str) or not TX_TYPE_RE.match(tx_type):
        raise InvalidTransaction(f"transaction type {tx_type!r} must match {TX_TYPE_RE.pattern}")
    if not isinstance(payload, dict):
        raise InvalidTransaction(f"payload must be a dict, got {type(payload).__name__}")
    try:
        # Normalised through canonical JSON so what is stored is exactly what was hashed.
        normalised = json.loads(canonical_json(payload))
    except (TypeError, ValueError) as exc:
        raise InvalidTransaction(f"payload is not JSON serialisable: {exc}") from None
    return {"type": tx_type, "payload": normalised, "timestamp": timestamp}


def record(tx_type, payload):
    """Appends one transaction to this node's ledger in a new signed block; returns the
    Transaction. Call it inside the database transaction that makes the change it records."""
    return record_many([(tx_type, payload)])[0]


def record_many(entries):
    """Seals [(tx_type, payload), ...] into one block; returns the Transactions in order."""
    if not entries:
        raise InvalidTransaction("a block needs at least one transaction")
    timestamp = now_timestamp()
    bodies = [_body(tx_type, payload, timestamp) for tx_type, payload in entries]
    attempts = 5
    for attempt in range(attempts):
        try:
            with transaction.atomic():
                block = _seal(bodies)
        except IntegrityError:
            # Another writer sealed this height first (possible on PostgreSQL; SQLite's
            # IMMEDIATE transactions serialise writers): retry on top of its block.
            if attempt == attempts - 1:
                raise
            continue
        for body in bodies:
            metrics.ledger_transactions.labels(body["type"]).inc()
        return list(block.transactions.order_by("index"))
    raise AssertionError("unreachable")


def _seal(bodies):
    from .models import Block, Transaction

    top = head()
    height = top.height + 1 if top else 1
    data = make_block(
        height,
        top.hash if top else GENESIS_PREVIOUS_HASH,
        bodies,
        sign=keys.sign,
        proposer=keys.node_public_key_hex(),
        timestamp=bodies[0]["timestamp"],
    )
    block = Block.objects.create(
        origin=None, **{k: data[k] for k in ("height", "hash", "previous_hash", "merkle_root", "timestamp", "proposer", "signature", "tx_count")}
    )
    Transaction.objects.bulk_create(
        Transaction(block=block, index=tx["index"], tx_type=tx["type"], payload=tx["payload"],
                    timestamp=tx["timestamp"], hash=tx["hash"])
        for tx in data["transactions"]
    )
    return block


# --- Announcements that peers apply (see chain_sync.APPLIERS) ----------------------------------


def announce_adapter_approved(adapter):
    """Records that `adapter` (inference.Adapter, with a blob_cid) is approved; peers replicating
    this ledger fetch the blob and approve the adapter locally."""
    if not adapter.blob_cid:
        raise InvalidTransaction(f"adapter {adapter} has no blob_cid, so peers could not fetch it")
    return record("adapter_approved", {
        "expert": adapter.expert,
        "version": adapter.version,
        "blob_cid": adapter.blob_cid,
        "sha256": adapter.sha256,
        "base_model": adapter.base_model,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "target_modules": list(adapter.target_modules or []),
        "size_bytes": adapter.size_bytes,
        "metrics": adapter.metrics or {},
    })


def announce_dataset_approved(dataset):
    """Records that `dataset` (mining.Dataset) is approved/minable; peers fetch and approve it."""
    return record("dataset_approved", {
        "name": dataset.name,
        "expert": dataset.expert,
        "format": dataset.format,
        "blob_cid": dataset.blob_cid,
        "sha256": dataset.sha256,
        "size_bytes": dataset.size_bytes,
        "examples": dataset.examples,
        "description": dataset.description,
    })
