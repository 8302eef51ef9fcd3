"""Content-addressed blob store: files named by their CIDv1 (raw codec, sha256, base32).

Writes are atomic (temp file + rename) and every read is verified against the name, so a corrupt
blob raises `CorruptBlob` and is never served. When `IPFS_API_URL` is set, new blobs are also
pinned to that IPFS node (best effort: the local copy is the source of truth).
"""

import base64
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)

# CIDv1 prefix: version 1, codec raw (0x55), multihash sha2-256 (0x12), digest length 32 (0x20).
CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])
CID_RE = re.compile(r"^b[a-z2-7]{58}$")
CHUNK = 1024 * 1024


class BlobError(Exception):
    pass


class BlobNotFound(BlobError):
    pass


class CorruptBlob(BlobError):
    pass


class InvalidCid(BlobError):
    pass


def cid_from_digest(digest):
    return "b" + base64.b32encode(CID_PREFIX + digest).decode().lower().rstrip("=")


def cid_for_bytes(data):
    return cid_from_digest(hashlib.sha256(data).digest())


def digest_from_cid(cid):
    """The sha256 digest a CID names; InvalidCid for anything that is not a raw sha256 CIDv1."""
    if not isinstance(cid, str) or not CID_RE.match(cid):
        raise InvalidCid(f"{cid!r} is not a CIDv1 (raw, sha256, base32) — expected 'bafkrei…' of 59 characters")
    raw = base64.b32decode(cid[1:].upper() + "=" * (-len(cid[1:]) % 8))
    if not raw.startswith(CID_PREFIX) or len(raw) != 36:
        raise InvalidCid(f"{cid!r} is not a raw sha256 CIDv1")
    return raw[4:]


def sha256_hex_from_cid(cid):
    return digest_from_cid(cid).hex()


def blob_dir():
    path = Path(settings.BLOB_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def path_for(cid):
    digest_from_cid(cid)  # validates; never build a path from an unchecked name
    return blob_dir() / cid[-2:] / cid


def exists(cid):
    try:
        return path_for(cid).exists()
    except InvalidCid:
        return False


def put_bytes(data):
    return put_stream([data])


def put_file(path):
    def chunks():
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                yield block

    return put_stream(chunks())


def put_stream(chunks, expected_cid=None):
    """Stores the concatenated chunks; returns (cid, size). With `expected_cid`, content that does
    not hash to it raises CorruptBlob and nothing is stored."""
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=blob_dir(), prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as handle:
            for block in chunks:
                digest.update(block)
                size += len(block)
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        cid = cid_from_digest(digest.digest())
        if expected_cid is not None and cid != expected_cid:
            raise CorruptBlob(f"content hashes to {cid}, not the expected {expected_cid}")
        final = path_for(cid)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _mirror_to_ipfs(cid, final)
    return cid, size


def read_bytes(cid):
    return b"".join(iter_verified(cid))


def iter_verified(cid):
    """Yields the blob's chunks; raises CorruptBlob at the end if the content does not match the
    CID (callers streaming to a client must buffer or verify first — see `verify`)."""
    path = path_for(cid)
    if not path.exists():
        raise BlobNotFound(f"blob {cid} is not in this node's store")
    expected = digest_from_cid(cid)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            yield block
    if digest.digest() != expected:
        log.error("corrupt blob %s at %s", cid, path)
        raise CorruptBlob(f"blob {cid} is corrupt on disk (sha256 mismatch)")


def verify(cid):
    """Re-hashes the stored blob; raises BlobNotFound or CorruptBlob."""
    for _ in iter_verified(cid):
        pass


def delete(cid):
    path = path_for(cid)
    if path.exists():
        path.unlink()


def _mirror_to_ipfs(cid, path):
    url = getattr(settings, "IPFS_API_URL", "")
    if not url:
        return
    import requests

    try:
        with open(path, "rb") as handle:
            response = requests.post(
                f"{url.rstrip('/')}/api/v0/add",
                params={"cid-version": 1, "raw-leaves": "true", "pin": "true"},
                files={"file": handle},
                timeout=30,
            )
        response.raise_for_status()
    except requests.RequestException as exc:
        log.warning("could not mirror blob %s to IPFS at %s: %s", cid, url, exc)
