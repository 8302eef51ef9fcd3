"""Two R3MES instances on one machine: a second instance runs under daphne in a subprocess with
its own R3MES_DATA_DIR (SQLite file, blob store, node key) and its own Redis database number;
this test process syncs its ledger, adapter and dataset over real HTTP."""

import json

import pytest
import requests
from django.core.management import call_command

from inference.models import Adapter
from mining import blobstore, chain_sync, ledger
from mining.models import Dataset, Peer

from .chain_helpers import Instance

ADAPTER_BYTES = b"PK\x03\x04" + bytes(range(256)) * 64  # a 16 KiB stand-in for a packed PEFT adapter
DATASET_BYTES = b'{"instruction": "name a prime", "response": "7"}\n' * 10

SEED = """
import json, sys
from django.db import transaction
from inference.models import Adapter
from mining import blobstore, keys, ledger
from mining.models import Dataset
adapter_bytes = bytes.fromhex(sys.argv[-2])
dataset_bytes = bytes.fromhex(sys.argv[-1])
with transaction.atomic():
    ledger.record("round_opened", {"round": 1, "expert": "coding"})
    cid, size = blobstore.put_bytes(adapter_bytes)
    adapter = Adapter.objects.create(expert="coding", version=Adapter.next_version("coding"), blob_cid=cid,
                                     sha256="ab" * 32, size_bytes=size, rank=8, alpha=16, target_modules=["q_proj"])
    adapter.approve()
    ledger.announce_adapter_approved(adapter)
    dcid, dsize = blobstore.put_bytes(dataset_bytes)
    dataset = Dataset.objects.create(name="primes", expert="math", format="jsonl", blob_cid=dcid,
                                     sha256=blobstore.sha256_hex_from_cid(dcid), size_bytes=dsize, examples=10)
    dataset.approve()
    ledger.announce_dataset_approved(dataset)
    ledger.record_many([("submission", {"miner": "m1", "shard": 0}), ("submission", {"miner": "m2", "shard": 1})])
print(json.dumps({"public_key": keys.node_public_key_hex(), "adapter_cid": cid, "dataset_cid": dcid}))
"""

ANNOUNCE = """
import json, sys
from inference.models import Adapter
from mining import blobstore, ledger
cid, size = blobstore.put_bytes(bytes.fromhex(sys.argv[-1]))
adapter = Adapter.objects.create(expert="medical", version=Adapter.next_version("medical"), blob_cid=cid,
                                 sha256="cd" * 32, size_bytes=size)
adapter.approve()
tx = ledger.announce_adapter_approved(adapter)
print(json.dumps({"cid": cid, "tx_hash": tx.hash, "height": tx.block.height}))
"""


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    node = Instance(tmp_path_factory.mktemp("second-instance"))
    node.manage("migrate", "--noinput", "-v", "0")
    node.seed = node.run_script(SEED, ADAPTER_BYTES.hex(), DATASET_BYTES.hex())
    node.start()
    yield node
    node.stop()


@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path):
    settings.BLOB_DIR = tmp_path / "blobs"


@pytest.fixture
def peer(db, instance):
    # The operator pins the key learnt out of band (here: from the seeding script).
    return Peer.objects.create(name="node-b", url=instance.url, public_key=instance.seed["public_key"])


def test_two_instances_sync_a_ledger_and_an_adapter(instance, peer, capsys):
    served = requests.get(f"{instance.url}/api/chain/node", timeout=5).json()
    assert served["public_key"] == peer.public_key

    call_command("r3mes", "chain", "sync")

    assert "node-b: 4 new block(s), height 4" in capsys.readouterr().out
    remote = requests.get(f"{instance.url}/api/chain/blocks", timeout=5).json()["blocks"]
    assert list(peer.blocks.order_by("height").values_list("hash", flat=True)) == [b["hash"] for b in remote]
    assert ledger.verify_chain(peer).ok
    adapter = Adapter.objects.get(expert="coding")
    assert adapter.status == Adapter.Status.APPROVED and adapter.blob_cid == instance.seed["adapter_cid"]
    assert blobstore.read_bytes(adapter.blob_cid) == ADAPTER_BYTES
    dataset = Dataset.objects.get(name="primes")
    assert dataset.status == Dataset.Status.APPROVED and blobstore.read_bytes(dataset.blob_cid) == DATASET_BYTES
    assert "coding" in Adapter.servable()


def test_a_corrupt_blob_and_a_forged_block_from_a_real_instance_are_refused(instance, peer):
    assert chain_sync.sync_peer(peer).height == 4

    # The peer's copy of a newly announced adapter rots on its disk: the peer refuses to serve it,
    # so the block announcing it is not stored and nothing is applied.
    medical = b"PK\x03\x04 medical expert " * 100
    announced = instance.run_script(ANNOUNCE, medical.hex())
    good = instance.blob_path(announced["cid"]).read_bytes()
    instance.blob_path(announced["cid"]).write_bytes(b"rotten" + good[6:])
    result = chain_sync.sync_peer(peer)
    assert "answered HTTP 503" in result.error and "corrupt" in result.error
    assert result.height == 4 and not Adapter.objects.filter(expert="medical").exists()
    assert not blobstore.exists(announced["cid"])
    instance.blob_path(announced["cid"]).write_bytes(good)

    # Someone edits the peer's database behind its back: the altered block is refused.
    instance.sql("UPDATE mining_transaction SET payload = ? WHERE hash = ?",
                 json.dumps({"expert": "medical", "version": 99}), announced["tx_hash"])
    result = chain_sync.sync_peer(peer)
    assert "block 5 from peer node-b was refused: transaction 0 was altered" in result.error
    assert result.height == 4 and not Adapter.objects.filter(expert="medical").exists()
    peer.refresh_from_db()
    assert "altered" in peer.last_error


def test_model_fetch_falls_back_to_a_real_peer_by_cid(instance, peer, settings, tmp_path):
    from mining import model_versions
    from mining.models import ModelVersion

    settings.MODEL_CACHE_DIR = tmp_path / "models"
    settings.R3MES_MODEL_DISK_MARGIN_BYTES = 0
    cid = instance.seed["adapter_cid"]
    version = ModelVersion.objects.create(
        name="tiny-1", file_name="tiny.bin", source_url="http://127.0.0.1:9/nothing-here.bin",  # down: fall back
        sha256=blobstore.sha256_hex_from_cid(cid), size_bytes=len(ADAPTER_BYTES), blob_cid=cid,
    )
    path = model_versions.fetch(version)
    assert path.read_bytes() == ADAPTER_BYTES
    assert model_versions.fetch_state(version).source == "peers"

