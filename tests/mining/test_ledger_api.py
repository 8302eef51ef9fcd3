import pytest
from django.urls import reverse

from governance.models import User
from mining import blobstore, keys, ledger
from mining.models import Block, Peer, Transaction




@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path):
    settings.BLOB_DIR = tmp_path / "blobs"

# --- GET /api/blobs/<cid> ---


def test_a_peer_gets_a_blob_by_cid_without_credentials(client, db):
    cid, _ = blobstore.put_bytes(b"packed adapter bytes")
    response = client.get(f"/api/blobs/{cid}")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"packed adapter bytes"
    assert response["Content-Type"] == "application/octet-stream"
    assert response["ETag"] == f'"{cid}"'


def test_a_malformed_cid_is_a_400(client, db):
    response = client.get("/api/blobs/not-a-cid")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cid"
    assert "CIDv1" in response.json()["error"]["message"]


def test_an_unknown_blob_is_a_404(client, db):
    response = client.get(f"/api/blobs/{blobstore.cid_for_bytes(b'never stored here')}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "blob_not_found"


def test_a_corrupt_blob_is_reported_and_never_served(client, db):
    cid, _ = blobstore.put_bytes(b"the real content")
    blobstore.path_for(cid).write_bytes(b"bit rot happened")
    response = client.get(f"/api/blobs/{cid}")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "corrupt_blob"
    assert b"bit rot" not in response.content


def test_blob_endpoint_only_answers_get(client, db):
    cid, _ = blobstore.put_bytes(b"x")
    assert client.post(f"/api/blobs/{cid}").status_code == 405


# --- Chain API ---


def test_blocks_are_served_with_their_transactions_from_a_height(client, db):
    for i in range(5):
        ledger.record("submission", {"i": i})
    data = client.get("/api/chain/blocks", {"from": 2, "limit": 2}).json()
    assert [b["height"] for b in data["blocks"]] == [2, 3]
    assert data["node"] == keys.node_public_key_hex()
    assert data["head"]["height"] == 5
    block = data["blocks"][0]
    assert block["transactions"][0]["payload"] == {"i": 1}
    # What is served verifies on its own, exactly as a peer will check it.
    ledger.check_block(block, height=2, previous_hash=Block.objects.get(height=1, origin=None).hash,
                       public_key=data["node"])


def test_blocks_past_the_head_are_an_empty_list(client, db):
    ledger.record("submission", {})
    assert client.get("/api/chain/blocks", {"from": 9}).json()["blocks"] == []


@pytest.mark.parametrize("params,param", [({"from": "x"}, "from"), ({"from": 0}, "from"),
                                          ({"limit": 0}, "limit"), ({"limit": 501}, "limit")])
def test_bad_block_query_parameters_are_a_400_naming_them(client, db, params, param):
    response = client.get("/api/chain/blocks", params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_head_and_node_describe_this_chain(client, db):
    assert client.get("/api/chain/head").json() == {"height": 0, "hash": "0" * 64, "timestamp": None}
    tx = ledger.record("round_opened", {"round": 1})
    head = client.get("/api/chain/head").json()
    assert head["height"] == 1 and head["hash"] == tx.block.hash
    node = client.get("/api/chain/node").json()
    assert node["public_key"] == keys.node_public_key_hex() and node["algorithm"] == "ed25519"


def test_peer_blocks_are_not_served_as_this_nodes_chain(client, db):
    peer = Peer.objects.create(name="p", url="http://127.0.0.1:9", public_key="a" * 64)
    Block.objects.create(origin=peer, height=1, hash="b" * 64, previous_hash="0" * 64, merkle_root="c" * 64,
                         timestamp="t", proposer="a" * 64, signature="d" * 128)
    assert client.get("/api/chain/blocks").json()["blocks"] == []


# --- Pages ---


def test_ledger_page_lists_blocks_and_the_verify_button_shows_tampering(alice_client, db):
    ledger.record("dataset_approved", {"name": "recipes"})
    tx = ledger.record("round_opened", {"round": 1})
    page = alice_client.get(reverse("mining-ledger"))
    assert page.status_code == 200
    assert b"dataset_approved" in page.content and b"Verify chain" in page.content
    ok = alice_client.post(reverse("mining-ledger-verify"), HTTP_HX_REQUEST="true")
    assert b"verified" in ok.content and b"2 blocks" in ok.content
    Transaction.objects.filter(pk=tx.pk).update(payload={"round": 666})
    bad = alice_client.post(reverse("mining-ledger-verify"), HTTP_HX_REQUEST="true")
    assert b"tampered" in bad.content and b"Block <strong>2</strong>" in bad.content


def test_verify_needs_a_login_and_a_post(client, db):
    assert client.post(reverse("mining-ledger-verify")).status_code == 302
    assert client.get(reverse("mining-ledger-verify")).status_code == 405


def test_block_detail_shows_header_and_transactions(client, db):
    tx = ledger.record("aggregation", {"merkle_root": "abc", "included": [1, 2]})
    page = client.get(reverse("mining-block", args=[1]))
    assert page.status_code == 200
    assert tx.block.hash.encode() in page.content and b"aggregation" in page.content
    assert client.get(reverse("mining-block", args=[2])).status_code == 404
    assert client.get(reverse("mining-block", args=[1]), {"peer": "x"}).status_code == 404


def test_peers_page_shows_status_and_only_staff_can_sync(client, alice_client, db):
    Peer.objects.create(name="berlin", url="http://127.0.0.1:9", public_key="a" * 64, last_error="peer berlin is unreachable")
    page = client.get(reverse("mining-peers"))
    assert b"berlin" in page.content and b"unreachable" in page.content
    peer = Peer.objects.get()
    assert alice_client.post(reverse("mining-peer-sync", args=[peer.pk])).status_code == 403


def test_staff_sync_now_reports_the_error_of_a_dead_peer(client, db, settings):
    settings.R3MES_PEER_CONNECT_TIMEOUT = 1
    staff = User.objects.create_user("op", "op@example.org", "x-pass-123456", is_staff=True)
    client.force_login(staff)
    peer = Peer.objects.create(name="gone", url="http://127.0.0.1:9", public_key="a" * 64)
    response = client.post(reverse("mining-peer-sync", args=[peer.pk]), follow=True)
    assert b"unreachable" in response.content
    peer.refresh_from_db()
    assert "unreachable" in peer.last_error


def test_admin_adds_a_peer_with_a_validated_key_and_syncs_it(admin_client, db, settings):
    settings.R3MES_PEER_CONNECT_TIMEOUT = 1
    bad = admin_client.post("/admin/mining/peer/add/", {"name": "x", "url": "http://127.0.0.1:9", "public_key": "XYZ",
                                                          "enabled": "on", "apply_announcements": "on"})
    assert b"64 lowercase hex" in bad.content and not Peer.objects.exists()
    admin_client.post("/admin/mining/peer/add/", {"name": "x", "url": "http://127.0.0.1:9", "public_key": "a" * 64,
                                                   "enabled": "on", "apply_announcements": "on"})
    peer = Peer.objects.get()
    response = admin_client.post("/admin/mining/peer/", {"action": "sync_now", "_selected_action": [peer.pk]}, follow=True)
    assert b"unreachable" in response.content
