"""Wallet addresses: `remes1` followed by 38 characters of the bech32 alphabet (lowercase letters
and digits). Addresses are identities here, not keys: R3MES does not custody funds."""

import re
import secrets

from django.core.exceptions import ValidationError

PREFIX = "remes1"
BECH32_ALPHABET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
WALLET_RE = re.compile(r"^remes1[a-z0-9]{38}$")


def generate_wallet_address():
    return PREFIX + "".join(secrets.choice(BECH32_ALPHABET) for _ in range(38))


def validate_wallet_address(value):
    if not WALLET_RE.match(value or ""):
        raise ValidationError(
            "Enter a wallet address of the form remes1 followed by 38 lowercase letters or digits "
            "(44 characters in all).",
            code="invalid_wallet",
        )
