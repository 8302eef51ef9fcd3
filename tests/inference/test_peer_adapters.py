"""An adapter replicated from a peer arrives as a blob only: the adapter cache unpacks it (verified
against its CID and sha256) and serves it; a corrupt blob is refused and never loaded."""

import pytest

from inference.adapter_cache import AdapterCache, CorruptAdapter, file_sha256
from inference.models import Adapter
from mining import blobstore
from mining.training import pack_dir
from tests.inference.helpers import save_identity_adapter, serving_engine  # noqa: F401

pytestmark = pytest.mark.django_db


@pytest.fixture
def peer_adapter(settings, tmp_path, serving_engine):  # noqa: F811
    settings.BLOB_DIR = tmp_path / "blobs"
    settings.ADAPTER_DIR = tmp_path / "adapters"
    made = save_identity_adapter(serving_engine, "peer-made", tmp_path / "peer" / "peer-made", rank=2)
    sha = file_sha256(made / "adapter_model.safetensors")
    cid, size = blobstore.put_bytes(pack_dir(made))
    return Adapter.objects.create(expert="coding", version=1, path="", blob_cid=cid, sha256=sha, rank=2, alpha=4,
                                  size_bytes=size, status=Adapter.Status.APPROVED)


def test_a_blob_only_adapter_is_unpacked_verified_and_served(peer_adapter, serving_engine):
    cache = AdapterCache(serving_engine, 64 * 2**20, 64 * 2**20)
    served = cache.acquire([peer_adapter])
    assert served == {"coding-v1": "disk"}
    assert "coding-v1" in serving_engine.adapters
    assert file_sha256(f"{peer_adapter.local_dir()}/adapter_model.safetensors") == peer_adapter.sha256
    cache.release(served)
    cache.close()
    serving_engine.unload_adapter("coding-v1")  # the engine is shared by the session


def test_a_corrupt_peer_blob_is_refused_and_never_loaded(peer_adapter, serving_engine):
    blobstore.path_for(peer_adapter.blob_cid).write_bytes(b"tampered")
    before = list(serving_engine.adapters)
    cache = AdapterCache(serving_engine, 64 * 2**20, 64 * 2**20)
    with pytest.raises(CorruptAdapter, match="corrupt"):
        cache.acquire([peer_adapter])
    assert list(serving_engine.adapters) == before and "coding-v1" not in before
    cache.close()
