import hashlib
import os
import stat
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, transaction

from mining import keys, ledger
from mining.merkle import merkle_root
from mining.models import Block, Transaction

from .chain_helpers import PeerKey, resign


def h(data):
    return hashlib.sha256(data).digest()


# --- Merkle root ---


def test_merkle_root_of_one_item_is_its_leaf_hash():
    assert merkle_root(["a"]) == h(b"a").hex()


def test_merkle_root_pairs_leaves_and_duplicates_the_last_on_odd_levels():
    a, b, c = h(b"a"), h(b"b"), h(b"c")
    assert merkle_root(["a", "b"]) == h(a + b).hex()
    assert merkle_root(["a", "b", "c"]) == h(h(a + b) + h(c + c)).hex()
    assert merkle_root([b"a", b"b", b"c"]) == merkle_root(["a", "b", "c"])


def test_merkle_root_changes_with_order_and_content_and_has_a_value_for_no_items():
    assert merkle_root(["a", "b"]) != merkle_root(["b", "a"])
    assert merkle_root(["a", "b"]) != merkle_root(["a", "x"])
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()


# --- Node key ---


def test_node_key_is_generated_once_with_owner_only_permissions(settings):
    public = keys.node_public_key_hex()
    assert keys.node_public_key_hex() == public
    path = keys.key_path()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    signature = keys.sign(b"header")
    assert keys.verify_signature(public, signature, b"header")
    assert not keys.verify_signature(public, signature, b"other header")
    assert not keys.verify_signature(PeerKey().public_hex, signature, b"header")
    assert not keys.verify_signature("zz", "zz", b"header")


# --- Recording ---


def test_record_seals_a_signed_block_linked_to_the_previous_one(db):
    first = ledger.record("dataset_approved", {"name": "d", "blob_cid": "x"})
    second = ledger.record("round_opened", {"round": 7})
    b1, b2 = first.block, second.block
    assert (b1.height, b2.height) == (1, 2)
    assert b1.previous_hash == ledger.GENESIS_PREVIOUS_HASH
    assert b2.previous_hash == b1.hash
    assert b1.merkle_root == merkle_root([first.hash])
    assert b1.proposer == keys.node_public_key_hex()
    assert keys.verify_signature(b1.proposer, b1.signature, ledger.header_bytes(b1.header()))
    assert b1.hash == hashlib.sha256(ledger.header_bytes(b1.header())).hexdigest()
    assert first.hash == ledger.tx_hash(first.body())


def test_record_many_puts_transactions_in_one_block_under_one_merkle_root(db):
    txs = ledger.record_many([("submission", {"miner": "a"}), ("submission", {"miner": "b"}),
                              ("aggregation", {"root": "r"})])
    block = txs[0].block
    assert block.tx_count == 3 and {tx.block_id for tx in txs} == {block.pk}
    assert [tx.index for tx in txs] == [0, 1, 2]
    assert block.merkle_root == merkle_root([tx.hash for tx in txs])


def test_payload_is_normalised_to_what_was_hashed(db):
    tx = ledger.record("governance_outcome", {"yes": Decimal("600.5"), "passed": True, "ratio": 0.25})
    tx.refresh_from_db()
    assert tx.payload == {"yes": "600.5", "passed": True, "ratio": 0.25}
    assert ledger.tx_hash(tx.body()) == tx.hash


@pytest.mark.parametrize("tx_type,payload,message", [
    ("Bad Type", {}, "transaction type"),
    ("x", {}, "transaction type"),
    ("submission", ["not", "a", "dict"], "payload must be a dict"),
    ("submission", {"value": float("nan")}, "not JSON serialisable"),
    ("submission", {"value": object()}, "not JSON serialisable"),
])
def test_bad_transactions_are_refused_and_nothing_is_written(db, tx_type, payload, message):
    with pytest.raises(ledger.InvalidTransaction, match=message):
        ledger.record(tx_type, payload)
    assert not Block.objects.exists()


def test_a_rolled_back_change_leaves_no_ledger_entry(db):
    ledger.record("round_opened", {"round": 1})
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            ledger.record("round_opened", {"round": 2})
            raise RuntimeError("the change this entry describes failed")
    assert list(Block.objects.values_list("height", flat=True)) == [1]
    assert ledger.record("round_opened", {"round": 3}).block.height == 2


def test_local_heights_are_unique(db):
    block = ledger.record("round_opened", {"round": 1}).block
    with pytest.raises(IntegrityError), transaction.atomic():
        Block.objects.create(height=1, hash="f" * 64, previous_hash=block.previous_hash, merkle_root=block.merkle_root,
                             timestamp=block.timestamp, proposer=block.proposer, signature=block.signature)


# --- Verification: every kind of tampering is found, at the right block ---


@pytest.fixture
def chain(db):
    for i in range(1, 6):
        ledger.record("submission", {"miner": f"m{i}", "loss": i / 10})
    return list(Block.objects.filter(origin__isnull=True).order_by("height"))


def test_an_untouched_chain_verifies(chain):
    report = ledger.verify_chain()
    assert report.ok and report.blocks == 5 and report.transactions == 5 and report.head_height == 5


def test_an_edited_transaction_payload_is_detected(chain):
    Transaction.objects.filter(block=chain[2]).update(payload={"miner": "m3", "loss": 0.0})
    report = ledger.verify_chain()
    assert not report.ok and report.first_bad_height == 3 and "altered" in report.problem
    assert report.blocks == 2


def test_an_edited_transaction_with_its_hash_recomputed_breaks_the_merkle_root(chain):
    tx = chain[1].transactions.get()
    tx.payload = {"miner": "mallory", "loss": 0.0}
    tx.hash = ledger.tx_hash(tx.body())
    tx.save()
    report = ledger.verify_chain()
    assert report.first_bad_height == 2 and "Merkle root" in report.problem


def test_a_rewritten_header_without_the_node_key_fails_the_signature(chain):
    Block.objects.filter(pk=chain[3].pk).update(timestamp="2020-01-01T00:00:00.000000Z")
    report = ledger.verify_chain()
    assert report.first_bad_height == 4 and "hash does not match" in report.problem
    block = Block.objects.get(pk=chain[3].pk)
    data = block.as_dict()
    other = PeerKey()
    resign(data, other)
    Block.objects.filter(pk=block.pk).update(hash=data["hash"], signature=data["signature"])
    report = ledger.verify_chain()
    assert report.first_bad_height == 4
    # The hash changed, so the next block's link breaks too — but block 4 is reported first.
    assert "bad signature" in report.problem


def test_a_removed_block_is_detected(chain):
    chain[2].delete()
    report = ledger.verify_chain()
    assert not report.ok and report.first_bad_height == 4 and "expected height 3" in report.problem


def test_a_broken_link_is_detected(chain):
    Block.objects.filter(pk=chain[4].pk).update(previous_hash="a" * 64)
    report = ledger.verify_chain()
    assert report.first_bad_height == 5 and "broken link" in report.problem


def test_chain_verify_command_reports_the_first_bad_block(chain, capsys):
    call_command("r3mes", "chain", "verify")
    assert "OK: 5 blocks" in capsys.readouterr().out
    Transaction.objects.filter(block=chain[1]).update(tx_type="aggregation")
    with pytest.raises(CommandError, match="FAILED at block 2"):
        call_command("r3mes", "chain", "verify")
    with pytest.raises(CommandError, match="No peer named"):
        call_command("r3mes", "chain", "verify", "--peer", "nobody")


def test_check_block_refuses_malformed_blocks():
    key = PeerKey()
    good = ledger.make_block(1, ledger.GENESIS_PREVIOUS_HASH, [], sign=key.sign, proposer=key.public_hex)
    ledger.check_block(good, height=1, previous_hash=ledger.GENESIS_PREVIOUS_HASH, public_key=key.public_hex)
    for broken, message in [
        ("not a block", "JSON object"),
        ({**good, "height": "1"}, "'height'"),
        ({**good, "height": True}, "'height'"),
        ({**good, "hash": "XYZ"}, "64 lowercase hex"),
        ({**good, "tx_count": 2}, "tx_count"),
        ({**good, "tx_count": 1, "transactions": [{"type": "x"}]}, "transaction 0"),
    ]:
        with pytest.raises(ledger.InvalidBlock, match=message):
            ledger.check_block(broken, height=1, previous_hash=ledger.GENESIS_PREVIOUS_HASH, public_key=key.public_hex)
