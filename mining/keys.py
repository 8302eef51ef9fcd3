"""The node's ed25519 key: generated once, kept in the data dir (0600), used to sign blocks.

Other nodes pin the public key (hex of the 32 raw bytes) in their Peer configuration, so losing
the key file means peers refuse this node's new blocks until they are told the new key.
"""

import os
import threading

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings

KEY_FILE = "node_key.ed25519"
_lock = threading.Lock()
_cache = {}


def key_path():
    return settings.DATA_DIR / KEY_FILE


def node_private_key():
    path = key_path()
    with _lock:
        if path in _cache:
            return _cache[path]
        if not path.exists():
            try:
                # O_EXCL: two processes starting together never end up with different keys.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(Ed25519PrivateKey.generate().private_bytes_raw())
                    handle.flush()
                    os.fsync(handle.fileno())
        seed = path.read_bytes()
        if len(seed) != 32:
            raise RuntimeError(f"node key {path} is damaged: expected 32 bytes, found {len(seed)}")
        _cache[path] = Ed25519PrivateKey.from_private_bytes(seed)
        return _cache[path]


def node_public_key_hex():
    return node_private_key().public_key().public_bytes_raw().hex()


def sign(data):
    return node_private_key().sign(data).hex()


def is_public_key(value):
    try:
        return isinstance(value, str) and len(bytes.fromhex(value)) == 32
    except ValueError:
        return False


def verify_signature(public_key_hex, signature_hex, data):
    """True when `signature_hex` is `public_key_hex`'s ed25519 signature of `data`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), data)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
