"""Chain sync against a peer played by a local HTTP server (real sockets) serving a chain signed
with the peer's own key — so every kind of forgery can be built. The end-to-end sync between two
real R3MES instances is in test_chain_sync_instances.py."""

import copy

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from inference.models import Adapter
from mining import blobstore, chain_sync, ledger
from mining.models import Block, Dataset, Peer
from r3mes_site import metrics

from .chain_helpers import FakePeer, PeerKey, build_chain, resign

ADAPTER_BYTES = b"PK\x03\x04 packed DoRA adapter for the coding expert"
DATASET_BYTES = b'{"instruction": "add 2 and 2", "response": "4"}\n'



@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path):
    settings.BLOB_DIR = tmp_path / "blobs"

@pytest.fixture
def key():
    return PeerKey()


@pytest.fixture
def fake():
    server = FakePeer()
    yield server
    server.close()


@pytest.fixture
def peer(db, fake, key, settings):
    settings.R3MES_PEER_READ_TIMEOUT = 2
    return Peer.objects.create(name="berlin", url=fake.url, public_key=key.public_hex)


def adapter_tx(data=ADAPTER_BYTES, expert="coding", version=3):
    return ("adapter_approved", {
        "expert": expert, "version": version, "blob_cid": blobstore.cid_for_bytes(data), "sha256": "ab" * 32,
        "base_model": "smollm2-135m", "rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
        "size_bytes": len(data), "metrics": {"eval_loss": 1.25},
    })


def dataset_tx(data=DATASET_BYTES):
    cid = blobstore.cid_for_bytes(data)
    return ("dataset_approved", {
        "name": "arithmetic", "expert": "math", "format": "jsonl", "blob_cid": cid,
        "sha256": blobstore.sha256_hex_from_cid(cid), "size_bytes": len(data), "examples": 1, "description": "",
    })


def serve_blobs(fake, *datas):
    for data in datas:
        fake.blobs[blobstore.cid_for_bytes(data)] = data


def test_sync_stores_verified_blocks_applies_announcements_and_fetches_blobs(fake, peer, key):
    fake.blocks = build_chain(key, [[("round_opened", {"round": 1})], [adapter_tx()], [dataset_tx(), ("submission", {"m": 1})]])
    serve_blobs(fake, ADAPTER_BYTES, DATASET_BYTES)

    result = chain_sync.sync_peer(peer)

    assert result.error == "" and result.accepted == 3 and result.height == 3
    peer.refresh_from_db()
    assert peer.last_height == 3 and peer.last_error == "" and peer.last_success_at is not None
    assert list(peer.blocks.values_list("height", flat=True)) == [1, 2, 3]
    assert not Block.objects.filter(origin__isnull=True).exists()  # the local chain stays separate
    assert ledger.verify_chain(peer).ok
    adapter = Adapter.objects.get(expert="coding")
    assert adapter.status == Adapter.Status.APPROVED and adapter.version == 1
    assert adapter.blob_cid == blobstore.cid_for_bytes(ADAPTER_BYTES)
    assert adapter.metrics["origin"] == {"peer": "berlin", "version": 3}
    assert blobstore.read_bytes(adapter.blob_cid) == ADAPTER_BYTES
    dataset = Dataset.objects.get(name="arithmetic")
    assert dataset.status == Dataset.Status.APPROVED and blobstore.read_bytes(dataset.blob_cid) == DATASET_BYTES


def test_a_second_sync_only_pulls_new_blocks_and_pages_through_them(fake, peer, key):
    fake.blocks = build_chain(key, [[("submission", {"i": i})] for i in range(5)])
    assert chain_sync.sync_peer(peer, limit=2).accepted == 5
    fake.blocks += build_chain(key, [[("submission", {"i": 5})]], start_previous=fake.blocks[-1]["hash"], start_height=6)
    fake.requests.clear()
    result = chain_sync.sync_peer(peer, limit=2)
    assert result.accepted == 1 and result.height == 6
    assert [path for path, _ in fake.requests] == ["/api/chain/blocks?from=6&limit=2"]
    assert chain_sync.sync_peer(peer).accepted == 0


def test_an_announced_adapter_already_here_is_approved_not_duplicated(fake, peer, key):
    blobstore.put_bytes(ADAPTER_BYTES)
    Adapter.objects.create(expert="coding", version=1, blob_cid=blobstore.cid_for_bytes(ADAPTER_BYTES), sha256="ab" * 32)
    fake.blocks = build_chain(key, [[adapter_tx()]])
    assert chain_sync.sync_peer(peer).error == ""
    assert Adapter.objects.get().status == Adapter.Status.APPROVED
    assert not [p for p, _ in fake.requests if p.startswith("/api/blobs/")]  # the verified local copy is used


def test_a_dataset_announcement_without_format_or_size_gets_them_from_the_blob(fake, peer, key):
    kind, payload = dataset_tx()
    del payload["format"], payload["size_bytes"], payload["description"]
    text = b"plain prose about numbers\nmore prose\n"
    text_cid = blobstore.cid_for_bytes(text)
    fake.blocks = build_chain(key, [[(kind, payload)], [(kind, {**payload, "name": "prose", "blob_cid": text_cid,
                                                                "sha256": blobstore.sha256_hex_from_cid(text_cid)})]])
    serve_blobs(fake, DATASET_BYTES, text)
    assert chain_sync.sync_peer(peer).error == ""
    assert Dataset.objects.get(name="arithmetic").format == "jsonl"
    assert Dataset.objects.get(name="arithmetic").size_bytes == len(DATASET_BYTES)
    assert Dataset.objects.get(name="prose").format == "text"


def test_local_decisions_win_over_a_peers_announcement(fake, peer, key):
    blobstore.put_bytes(ADAPTER_BYTES)
    Adapter.objects.create(expert="coding", version=1, blob_cid=blobstore.cid_for_bytes(ADAPTER_BYTES),
                           sha256="ab" * 32, status=Adapter.Status.RETIRED)
    fake.blocks = build_chain(key, [[adapter_tx()]])
    assert chain_sync.sync_peer(peer).accepted == 1
    assert Adapter.objects.get().status == Adapter.Status.RETIRED


def refused(peer, fake, match, reason):
    before = metrics.chain_sync_failures.labels(reason)._value.get()
    result = chain_sync.sync_peer(peer)
    assert match in result.error, result.error
    peer.refresh_from_db()
    assert match in peer.last_error
    assert metrics.chain_sync_failures.labels(reason)._value.get() == before + 1
    return result


def test_a_block_with_a_bad_signature_is_refused_and_nothing_from_it_is_applied(fake, peer, key):
    fake.blocks = build_chain(key, [[("round_opened", {"round": 1})], [adapter_tx()]])
    serve_blobs(fake, ADAPTER_BYTES)
    resign(fake.blocks[1], PeerKey())  # an impostor signs block 2, claiming to be the peer
    fake.blocks[1]["proposer"] = key.public_hex
    result = refused(peer, fake, "block 2 from peer berlin was refused: bad signature", "invalid_block")
    assert result.accepted == 1 and peer.last_height == 1
    assert list(peer.blocks.values_list("height", flat=True)) == [1]
    assert not Adapter.objects.exists()
    assert not blobstore.exists(blobstore.cid_for_bytes(ADAPTER_BYTES))


def test_a_chain_signed_by_another_key_is_refused(fake, peer):
    fake.blocks = build_chain(PeerKey(), [[("round_opened", {"round": 1})]])
    refused(peer, fake, "not by the expected key", "invalid_block")
    assert not peer.blocks.exists()


def test_a_broken_link_is_refused(fake, peer, key):
    fake.blocks = build_chain(key, [[("submission", {"i": 1})], [dataset_tx()]])
    serve_blobs(fake, DATASET_BYTES)
    fake.blocks[1]["previous_hash"] = "e" * 64
    resign(fake.blocks[1], key)  # even the real key cannot make a block that skips history
    refused(peer, fake, "broken link", "invalid_block")
    assert peer.blocks.count() == 1 and not Dataset.objects.exists()


def test_a_wrong_merkle_root_is_refused(fake, peer, key):
    fake.blocks = build_chain(key, [[adapter_tx(), ("submission", {"i": 1})]])
    serve_blobs(fake, ADAPTER_BYTES)
    fake.blocks[0]["merkle_root"] = "d" * 64
    resign(fake.blocks[0], key)
    refused(peer, fake, "wrong Merkle root", "invalid_block")
    assert not peer.blocks.exists() and not Adapter.objects.exists()


def test_an_altered_transaction_is_refused(fake, peer, key):
    fake.blocks = build_chain(key, [[adapter_tx()]])
    serve_blobs(fake, ADAPTER_BYTES)
    fake.blocks[0]["transactions"][0]["payload"]["expert"] = "medical"
    refused(peer, fake, "transaction 0 was altered", "invalid_block")
    assert not Adapter.objects.exists()


def test_a_peer_rewriting_history_after_a_sync_is_refused(fake, peer, key):
    fake.blocks = build_chain(key, [[("submission", {"i": 1})], [("submission", {"i": 2})]])
    chain_sync.sync_peer(peer)
    rewritten = build_chain(key, [[("submission", {"i": 1})], [("submission", {"i": 666})], [("submission", {"i": 3})]])
    fake.blocks = rewritten
    refused(peer, fake, "broken link", "invalid_block")
    assert peer.blocks.count() == 2


def test_a_corrupt_blob_is_refused_and_the_block_is_not_stored(fake, peer, key):
    fake.blocks = build_chain(key, [[("submission", {"i": 1})], [adapter_tx()]])
    cid = blobstore.cid_for_bytes(ADAPTER_BYTES)
    fake.blobs[cid] = b"PK\x03\x04 poisoned weights"
    before = metrics.corrupt_blobs.labels("peer")._value.get()
    refused(peer, fake, f"blob {cid} from peer berlin was refused", "corrupt_blob")
    assert metrics.corrupt_blobs.labels("peer")._value.get() == before + 1
    assert peer.blocks.count() == 1 and not Adapter.objects.exists() and not blobstore.exists(cid)
    assert not list(blobstore.blob_dir().glob(".incoming-*"))
    # Once the peer serves the right content, the same block goes through.
    fake.blobs[cid] = ADAPTER_BYTES
    assert chain_sync.sync_peer(peer).accepted == 1 and Adapter.objects.exists()


def test_a_signed_but_malformed_announcement_is_refused(fake, peer, key):
    kind, payload = adapter_tx()
    payload["blob_cid"] = "Qm-not-a-cid"
    fake.blocks = build_chain(key, [[(kind, payload)]])
    refused(peer, fake, "transaction 0 (adapter_approved)", "bad_announcement")
    # The operator can still replicate the chain without applying its announcements.
    peer.apply_announcements = False
    peer.save()
    assert chain_sync.sync_peer(peer).accepted == 1 and not Adapter.objects.exists()


def test_a_peer_that_is_down_is_a_clear_error(db, settings):
    settings.R3MES_PEER_CONNECT_TIMEOUT = 1
    peer = Peer.objects.create(name="down", url="http://127.0.0.1:9", public_key="a" * 64)
    result = refused(peer, None, "peer down is unreachable at http://127.0.0.1:9/api/chain/blocks", "unreachable")
    assert result.accepted == 0 and peer.last_sync_at is not None and peer.last_success_at is None


@pytest.mark.parametrize("route,match", [
    ((200, b"<html>Welcome to nginx</html>", "text/html"), "answered something that is not JSON"),
    ((200, b'{"rows": []}', "application/json"), "without a 'blocks' list"),
    ((200, b'{"blocks": ["nonsense"]}', "application/json"), "a block must be a JSON object"),
    ((500, b"Internal Server Error", "text/plain"), "answered HTTP 500"),
    ((200, b"[" * 100_000 + b"]" * 100_000, "application/json"), "not JSON"),
    ((200, b'{"blocks": [{"height": 1, "previous_hash": "' + b"0" * 64 + b'", "merkle_root": "' + b"0" * 64
      + b'", "timestamp": "' + b"x" * 500 + b'", "proposer": "' + b"0" * 64 + b'", "tx_count": 0, "hash": "'
      + b"0" * 64 + b'", "signature": "' + b"0" * 128 + b'", "transactions": []}]}', "application/json"),
     "longer than 40"),
])
def test_a_peer_answering_garbage_is_a_clear_error(fake, peer, route, match):
    fake.routes["/api/chain/blocks"] = route
    result = chain_sync.sync_peer(peer)
    assert match in result.error
    assert not peer.blocks.exists()


def test_a_peer_that_times_out_is_a_clear_error(fake, peer, key, settings):
    settings.R3MES_PEER_READ_TIMEOUT = 0.3
    fake.blocks = build_chain(key, [[("submission", {})]])
    fake.delay = 1
    refused(peer, fake, "did not answer within 0.3 s", "timeout")


def test_an_oversized_page_is_refused(fake, peer, key, settings):
    settings.R3MES_PEER_MAX_PAGE_BYTES = 1024
    fake.blocks = build_chain(key, [[("submission", {"padding": "x" * 2000})]])
    refused(peer, fake, "more than 1024 bytes", "garbage")


def test_a_sync_already_running_for_the_peer_is_skipped(fake, peer, key):
    from django.core.cache import cache

    cache.add(f"r3mes:chain-sync:{peer.pk}", "1", timeout=30)
    try:
        result = chain_sync.sync_peer(peer)
    finally:
        cache.delete(f"r3mes:chain-sync:{peer.pk}")
    assert result.skipped and "another sync" in result.error


def test_chain_sync_command_and_beat_task_report_each_peer(fake, peer, key, capsys, db):
    from mining.tasks import sync_chain

    fake.blocks = build_chain(key, [[("submission", {})]])
    call_command("r3mes", "chain", "sync")
    assert "berlin: 1 new block(s), height 1" in capsys.readouterr().out
    Peer.objects.create(name="down", url="http://127.0.0.1:9", public_key="a" * 64)
    with pytest.raises(CommandError, match="sync failed for down"):
        call_command("r3mes", "chain", "sync")
    summaries = sync_chain()
    assert summaries[0].startswith("berlin: 0 new block(s)") and "ERROR" in summaries[1]
    call_command("r3mes", "chain", "verify", "--peer", "berlin")


def test_disabled_peers_are_not_synced(fake, peer, key):
    peer.enabled = False
    peer.save()
    fake.blocks = build_chain(key, [[("submission", {})]])
    assert chain_sync.sync_all() == []


def test_tampering_a_replicated_block_is_found_by_verify(fake, peer, key):
    fake.blocks = build_chain(key, [[("submission", {"i": 1})], [("submission", {"i": 2})]])
    chain_sync.sync_peer(peer)
    block = peer.blocks.get(height=2)
    block.transactions.update(payload={"i": 3})
    report = ledger.verify_chain(peer)
    assert not report.ok and report.first_bad_height == 2


def test_build_chain_helper_is_verifiable(key):
    blocks = build_chain(key, [[("submission", {})], [("submission", {})]])
    ledger.check_block(copy.deepcopy(blocks[1]), height=2, previous_hash=blocks[0]["hash"], public_key=key.public_hex)
