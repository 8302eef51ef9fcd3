import hashlib
import secrets
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from .wallet import generate_wallet_address, validate_wallet_address


class User(AbstractUser):
    """A member of the R3MES community: a wallet address and a stake that gives voting power."""

    wallet_address = models.CharField(
        max_length=44,
        unique=True,
        default=generate_wallet_address,
        validators=[validate_wallet_address],
        help_text="remes1 followed by 38 lowercase letters or digits",
    )
    stake = models.DecimalField(
        max_digits=30, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(Decimal("0"))]
    )

    class Meta:
        ordering = ["username"]

    def __str__(self):
        return self.username


class ApiToken(models.Model):
    """A bearer token for the JSON API. Only its SHA-256 is stored; the token is shown once."""

    PREFIX = "r3m_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    hint = models.CharField(max_length=12, editable=False, help_text="First characters, to recognise it")
    created = models.DateTimeField(default=timezone.now)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return f"{self.name} ({self.hint}…)"

    @staticmethod
    def hash_key(raw):
        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name):
        """Creates a token and returns (token, raw_key); the raw key is never stored."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, key_hash=cls.hash_key(raw), hint=raw[:10])
        return token, raw

    @classmethod
    def authenticate(cls, raw):
        if not raw.startswith(cls.PREFIX) or len(raw) > 200:
            return None
        token = (
            cls.objects.select_related("user")
            .filter(key_hash=cls.hash_key(raw), revoked_at__isnull=True, user__is_active=True)
            .first()
        )
        if token is None:
            return None
        now = timezone.now()
        # Record use at most once a minute: a busy client must not turn every call into a write.
        if token.last_used is None or now - token.last_used > timedelta(minutes=1):
            cls.objects.filter(pk=token.pk).update(last_used=now)
            token.last_used = now
        return token

    @property
    def is_active(self):
        return self.revoked_at is None

    def revoke(self):
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])
