"""Backbone downloads from a local HTTP server (127.0.0.1, a thread), the blob store and peers;
activation and rollback with ledger entries; the CLI and the models page."""

import hashlib
import io
import shutil
from collections import namedtuple

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from governance.models import User
from mining import blobstore, ledger, model_versions
from mining.models import BackboneFetch, ModelVersion, Peer, Transaction

from .chain_helpers import FakePeer

WEIGHTS = bytes(range(256)) * 4096  # 1 MiB of "backbone"
OTHER = b"\x01\x02" * 300_000


@pytest.fixture(autouse=True)
def dirs(settings, tmp_path):
    settings.BLOB_DIR = tmp_path / "blobs"
    settings.MODEL_CACHE_DIR = tmp_path / "models"
    settings.R3MES_MODEL_DISK_MARGIN_BYTES = 1024


@pytest.fixture
def site():
    server = FakePeer()
    server.files["/weights.bin"] = WEIGHTS
    server.files["/other.bin"] = OTHER
    yield server
    server.close()


def make_version(name="smol-2", data=WEIGHTS, url=None, blob_cid="", **extra):
    fields = dict(name=name, file_name="model.bin", source_url=url or "", sha256=hashlib.sha256(data).hexdigest(),
                  size_bytes=len(data), blob_cid=blob_cid)
    fields.update(extra)
    return ModelVersion.objects.create(**fields)


def test_fetch_downloads_verifies_and_places_the_file(db, site):
    version = make_version(url=f"{site.url}/weights.bin")
    bar = io.StringIO()
    path = model_versions.fetch(version, progress=bar)
    assert path == model_versions.file_path(version) and path.read_bytes() == WEIGHTS
    assert not path.with_name("model.bin.part").exists()
    state = model_versions.fetch_state(version)
    assert state.state == BackboneFetch.State.READY and state.source == "source URL" and state.bytes_done == len(WEIGHTS)
    assert model_versions.is_ready(version)
    assert "100%" in bar.getvalue()  # the tqdm progress bar ran to the end
    # A second fetch finds the verified file and downloads nothing.
    site.requests.clear()
    assert model_versions.fetch(version) == path and site.requests == []


def test_a_hash_mismatch_deletes_the_file_and_errors(db, site):
    version = make_version(url=f"{site.url}/weights.bin", sha256="0" * 64)
    with pytest.raises(model_versions.FetchError, match="sha256 mismatch .* the file was deleted"):
        model_versions.fetch(version)
    target = model_versions.file_path(version)
    assert not target.exists() and not target.with_name("model.bin.part").exists()
    state = model_versions.fetch_state(version)
    assert state.state == BackboneFetch.State.FAILED and "sha256 mismatch" in state.error
    assert not model_versions.is_ready(version)


def test_not_enough_disk_space_is_refused_before_downloading(db, site, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    version = make_version(url=f"{site.url}/weights.bin", size_bytes=free + 10 * 1024**3)
    with pytest.raises(model_versions.FetchError, match="not enough disk space"):
        model_versions.fetch(version)
    assert site.requests == []
    assert model_versions.fetch_state(version).state == BackboneFetch.State.FAILED


def test_the_blob_store_is_the_fallback_when_the_source_fails(db, site):
    cid, _ = blobstore.put_bytes(WEIGHTS)
    version = make_version(url=f"{site.url}/missing.bin", blob_cid=cid)
    path = model_versions.fetch(version)
    assert path.read_bytes() == WEIGHTS
    assert model_versions.fetch_state(version).source == "blob store"


def test_a_corrupt_local_blob_falls_through_to_peers(db, site):
    cid, _ = blobstore.put_bytes(WEIGHTS)
    blobstore.path_for(cid).write_bytes(b"rot" + WEIGHTS[3:])
    Peer.objects.create(name="dead", url="http://127.0.0.1:9", public_key="a" * 64)
    peer_server = FakePeer()
    try:
        peer_server.blobs[cid] = WEIGHTS
        Peer.objects.create(name="alive", url=peer_server.url, public_key="b" * 64)
        version = make_version(blob_cid=cid)
        assert model_versions.fetch(version).read_bytes() == WEIGHTS
        assert model_versions.fetch_state(version).source == "peers"
    finally:
        peer_server.close()


def test_every_failed_source_is_named_when_nothing_works(db, site):
    cid = blobstore.cid_for_bytes(WEIGHTS)
    version = make_version(url=f"{site.url}/missing.bin", blob_cid=cid)
    with pytest.raises(model_versions.FetchError) as caught:
        model_versions.fetch(version)
    message = str(caught.value)
    assert "source URL: " in message and "HTTP 404" in message
    assert "blob store: " in message and "no enabled peers" in message


def test_an_interrupted_download_resumes_from_the_partial_file(db, site):
    site.break_after["/weights.bin"] = 300_000
    version = make_version(url=f"{site.url}/weights.bin")
    with pytest.raises(model_versions.FetchError, match="broke off"):
        model_versions.fetch(version)
    part = model_versions.file_path(version).with_name("model.bin.part")
    kept = part.stat().st_size
    assert 0 < kept <= 300_000  # whole chunks received before the break
    path = model_versions.fetch(version)
    assert path.read_bytes() == WEIGHTS
    assert site.requests[-1][1].get("Range") == f"bytes={kept}-"


def test_a_fetch_already_running_is_not_started_twice(db, site):
    version = make_version(url=f"{site.url}/weights.bin")
    model_versions._claim(version)
    with pytest.raises(model_versions.FetchError, match="already being fetched"):
        model_versions.fetch(version)
    # A claim that stopped reporting progress (its process died) can be taken over.
    BackboneFetch.objects.filter(version=version).update(updated="2000-01-01T00:00:00Z")
    assert model_versions.fetch(version).exists()


@pytest.mark.parametrize("fields,message", [
    ({"file_name": "../../etc/passwd"}, "not a safe file name"),
    ({"sha256": "nothex"}, "no valid sha256"),
    ({"blob_cid": "bafkrei-not-valid"}, "CIDv1"),
    ({"blob_cid": blobstore.cid_for_bytes(b"different")}, "does not name the same content"),
    ({"url": ""}, "neither a source URL nor a blob CID"),
])
def test_bad_version_records_are_clear_errors(db, site, fields, message):
    fields.setdefault("url", f"{site.url}/weights.bin")
    version = make_version(**fields)
    with pytest.raises(model_versions.FetchError, match=message):
        model_versions.fetch(version)


def test_model_fetch_command(db, site, capsys):
    make_version(url=f"{site.url}/weights.bin")
    call_command("r3mes", "model", "fetch", "smol-2", "--no-progress")
    assert "smol-2: verified file at" in capsys.readouterr().out
    with pytest.raises(CommandError, match="No model version named 'nope'"):
        call_command("r3mes", "model", "fetch", "nope")
    make_version(name="broken", url=f"{site.url}/weights.bin", sha256="1" * 64)
    with pytest.raises(CommandError, match="sha256 mismatch"):
        call_command("r3mes", "model", "fetch", "broken", "--no-progress")


def test_the_fetch_task_records_failures_without_raising(db, site):
    from mining.tasks import fetch_model_version

    version = make_version(url=f"{site.url}/missing.bin")
    assert "HTTP 404" in fetch_model_version(version.pk)
    assert model_versions.fetch_state(version).state == BackboneFetch.State.FAILED


# --- Activation and rollback ---

Pair = namedtuple("Pair", "one two")


@pytest.fixture
def fetched(db, site):
    one = make_version("smol-1", url=f"{site.url}/weights.bin")
    two = make_version("smol-2", data=OTHER, url=f"{site.url}/other.bin")
    model_versions.fetch(one)
    model_versions.fetch(two)
    return Pair(one, two)


def test_activate_and_roll_back_are_recorded_on_the_ledger(fetched):
    assert model_versions.active_backbone_path() is None
    model_versions.activate(fetched.one)
    assert model_versions.active_backbone_path() == model_versions.file_path(fetched.one)
    model_versions.activate(fetched.two)
    fetched.one.refresh_from_db()
    fetched.two.refresh_from_db()
    assert fetched.two.status == "active" and fetched.two.previous == fetched.one and fetched.one.status == "available"
    assert model_versions.active_backbone_path() == model_versions.file_path(fetched.two)

    back = model_versions.rollback()
    assert back == fetched.one
    fetched.two.refresh_from_db()
    assert fetched.two.status == "retired" and ModelVersion.active() == fetched.one
    assert model_versions.active_backbone_path().read_bytes() == WEIGHTS

    txs = list(Transaction.objects.filter(block__origin__isnull=True).order_by("block__height"))
    assert [tx.tx_type for tx in txs] == ["backbone_activated", "backbone_activated", "backbone_rolled_back"]
    assert txs[1].payload["previous"] == "smol-1" and txs[1].payload["sha256"] == fetched.two.sha256
    assert txs[2].payload["from"] == "smol-2" and txs[2].payload["name"] == "smol-1"
    assert ledger.verify_chain().ok
    with pytest.raises(model_versions.ActivationError, match="no previous version"):
        model_versions.rollback()


def test_activation_refuses_unfetched_or_already_active_versions(db, site):
    version = make_version(url=f"{site.url}/weights.bin")
    with pytest.raises(model_versions.ActivationError, match="not fetched yet"):
        model_versions.activate(version)
    with pytest.raises(model_versions.ActivationError, match="nothing to roll back"):
        model_versions.rollback()
    # Governance may activate before the file is here; the worker keeps its backbone meanwhile.
    model_versions.activate(version, require_file=False)
    assert model_versions.active_backbone_path() is None
    with pytest.raises(model_versions.ActivationError, match="already the active"):
        model_versions.activate(version, require_file=False)
    model_versions.fetch(version)
    assert model_versions.active_backbone_path() == model_versions.file_path(version)


def test_a_governance_activation_queues_the_fetch_after_commit(db, site, django_capture_on_commit_callbacks):
    from r3mes_site.celery import app

    version = make_version(url=f"{site.url}/weights.bin")
    app.conf.task_always_eager = True
    try:
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            model_versions.activate(version, require_file=False)
    finally:
        app.conf.task_always_eager = False
    assert len(callbacks) == 1
    assert model_versions.active_backbone_path() == model_versions.file_path(version)


def test_a_deleted_file_is_no_longer_served_as_the_backbone(fetched):
    model_versions.activate(fetched.one)
    model_versions.file_path(fetched.one).unlink()
    assert model_versions.active_backbone_path() is None


def test_model_cli_activate_list_and_rollback(fetched, capsys):
    call_command("r3mes", "model", "activate", "smol-1")
    call_command("r3mes", "model", "activate", "smol-2")
    call_command("r3mes", "model", "list")
    out = capsys.readouterr().out
    assert "smol-2 is now the active backbone" in out and "smol-2\tactive\tfetched" in out
    call_command("r3mes", "model", "rollback")
    assert "Rolled back to smol-1" in capsys.readouterr().out
    with pytest.raises(CommandError, match="already the active"):
        call_command("r3mes", "model", "activate", "smol-1")


def test_models_page_shows_state_and_staff_can_activate_and_roll_back(fetched, client, alice_client):
    page = client.get(reverse("mining-models"))
    assert page.status_code == 200 and b"smol-1" in page.content and b"verified" in page.content
    assert alice_client.post(reverse("mining-model-activate", args=[fetched.one.pk])).status_code == 403
    staff = User.objects.create_user("op", "op@example.org", "x-pass-123456", is_staff=True)
    client.force_login(staff)
    client.post(reverse("mining-model-activate", args=[fetched.one.pk]))
    response = client.post(reverse("mining-model-activate", args=[fetched.two.pk]), follow=True)
    assert b"smol-2 is now the active backbone" in response.content
    assert b"Roll back to smol-1" in response.content
    response = client.post(reverse("mining-model-rollback"), follow=True)
    assert b"Rolled back to smol-1" in response.content
    response = client.post(reverse("mining-model-rollback"), follow=True)
    assert b"no previous version" in response.content


def test_staff_fetch_button_runs_the_task(db, site, client, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True
    from r3mes_site.celery import app

    app.conf.task_always_eager = True
    try:
        staff = User.objects.create_user("op", "op@example.org", "x-pass-123456", is_staff=True)
        client.force_login(staff)
        version = make_version(url=f"{site.url}/weights.bin")
        response = client.post(reverse("mining-model-fetch", args=[version.pk]), follow=True)
        assert b"Fetching smol-2" in response.content
        assert model_versions.is_ready(version)
    finally:
        app.conf.task_always_eager = False


def test_admin_actions_activate_and_roll_back(fetched, admin_client):
    url = "/admin/mining/modelversion/"
    both = [fetched.one.pk, fetched.two.pk]
    response = admin_client.post(url, {"action": "activate_version", "_selected_action": both}, follow=True)
    assert b"Select exactly one version" in response.content
    admin_client.post(url, {"action": "activate_version", "_selected_action": [fetched.one.pk]})
    response = admin_client.post(url, {"action": "activate_version", "_selected_action": [fetched.two.pk]}, follow=True)
    assert b"Smol-2 is now the active backbone" in response.content  # the admin capitalises messages
    response = admin_client.post(url, {"action": "rollback_version", "_selected_action": [fetched.two.pk]}, follow=True)
    assert b"Rolled back to smol-1" in response.content
    assert ModelVersion.active() == fetched.one


def test_admin_fetch_action_queues_the_task(db, site, admin_client):
    from r3mes_site.celery import app

    version = make_version(url=f"{site.url}/weights.bin")
    app.conf.task_always_eager = True
    try:
        response = admin_client.post("/admin/mining/modelversion/",
                                     {"action": "fetch_versions", "_selected_action": [version.pk]}, follow=True)
    finally:
        app.conf.task_always_eager = False
    assert b"Queued 1 fetch" in response.content
    assert model_versions.is_ready(version)
