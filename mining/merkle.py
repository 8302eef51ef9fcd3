"""Merkle root over a list of items (sha256, the last node duplicated on odd levels).

Leaves are sha256 of each item (str → UTF-8, bytes as is); an inner node is sha256(left || right)
of the raw digests. The root of an empty list is sha256(b""), so every list has a root.
"""

import hashlib


def merkle_root(items):
    level = [hashlib.sha256(item.encode() if isinstance(item, str) else bytes(item)).digest() for item in items]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0].hex()
