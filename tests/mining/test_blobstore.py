import hashlib

import pytest

from mining import blobstore


@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path):
    settings.BLOB_DIR = tmp_path / "blobs"


def test_cid_of_known_content_matches_ipfs():
    # `ipfs add --cid-version 1 --raw-leaves` of "hello world\n" gives this CID.
    assert blobstore.cid_for_bytes(b"hello world\n") == "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"


def test_put_then_read_round_trips_and_names_by_content():
    cid, size = blobstore.put_bytes(b"adapter weights")
    assert size == 15
    assert blobstore.read_bytes(cid) == b"adapter weights"
    assert blobstore.sha256_hex_from_cid(cid) == hashlib.sha256(b"adapter weights").hexdigest()
    assert blobstore.put_bytes(b"adapter weights")[0] == cid


def test_a_corrupt_blob_raises_and_is_never_served():
    cid, _ = blobstore.put_bytes(b"original")
    blobstore.path_for(cid).write_bytes(b"tampered")
    with pytest.raises(blobstore.CorruptBlob):
        blobstore.read_bytes(cid)
    with pytest.raises(blobstore.CorruptBlob):
        blobstore.verify(cid)


def test_content_that_does_not_match_the_expected_cid_is_not_stored():
    expected = blobstore.cid_for_bytes(b"what the peer promised")
    with pytest.raises(blobstore.CorruptBlob):
        blobstore.put_stream([b"something else"], expected_cid=expected)
    assert not blobstore.exists(expected)
    assert not list(blobstore.blob_dir().glob(".incoming-*"))


@pytest.mark.parametrize("bad", ["", "Qm123", "../../etc/passwd", "b" + "a" * 58 + "/", "bafkrei" + "1" * 52])
def test_malformed_cids_are_rejected_before_touching_the_disk(bad):
    with pytest.raises(blobstore.InvalidCid):
        blobstore.path_for(bad)


def test_missing_blob_is_reported():
    with pytest.raises(blobstore.BlobNotFound):
        blobstore.read_bytes(blobstore.cid_for_bytes(b"never stored"))
