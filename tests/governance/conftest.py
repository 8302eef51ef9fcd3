from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from governance.actions import do_create_proposal
from governance.models import User
from inference.models import Adapter
from mining.models import Dataset, ModelVersion
from tests.conftest import PASSWORD


@pytest.fixture
def carol(db):
    return User.objects.create_user("carol", "carol@example.org", PASSWORD, stake=Decimal("400"))


@pytest.fixture
def adapter(db):
    return Adapter.objects.create(expert="coding", version=1, sha256="a" * 64, metrics={"eval_loss": 1.23})


@pytest.fixture
def dataset(db):
    return Dataset.objects.create(name="python-qa", expert="coding", format="jsonl", blob_cid="bafk-demo",
                                  sha256="b" * 64, examples=120)


@pytest.fixture
def backbones(db):
    old = ModelVersion.objects.create(name="smollm2-135m", file_name="m.gguf", sha256="c" * 64, status="active")
    new = ModelVersion.objects.create(name="bitnet-2b", file_name="b.safetensors", sha256="d" * 64)
    return old, new


@pytest.fixture
def voting_proposal(alice, bob, carol, adapter, settings):
    """An adapter proposal whose voting is open; total snapshotted power 2000 (1000 + 600 + 400)."""
    return do_create_proposal(alice, kind="adapter", target=adapter.pk, title="Approve coding v1",
                              deposit=settings.R3MES_GOV_MIN_DEPOSIT)


def after_voting(proposal, seconds=1):
    return proposal.voting_end + timedelta(seconds=seconds)


def soon(seconds=1):
    return timezone.now() + timedelta(seconds=seconds)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # The shared fixtures create users with passwords; PBKDF2 on a busy 2-core box costs seconds.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
