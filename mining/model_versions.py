"""Backbone versions on this node: download (hybrid: source URL, then blob store, then peers by
CID), verification, activation and rollback.

A version's file lives at MODEL_CACHE_DIR/backbones/<name>/<file_name>. Downloads go to
`<file>.part` (resumed with an HTTP Range request when the source allows it) and are renamed into
place only after the sha256 matched, so the final path only ever holds a verified file; a
mismatch deletes the partial file. Free disk space is checked before any byte is written.

Activation (normally executed by a passed governance proposal; operators use the CLI or the
models page) makes one version active, remembers the one it replaces in `previous`, and records
`backbone_activated` on the ledger in the same database transaction. `rollback()` returns to that
previous version and retires the current one. The inference worker consults
`active_backbone_path()` to know which file to serve (see its docstring).
"""

import functools
import hashlib
import logging
import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path

import requests
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from r3mes_site import metrics

from . import blobstore, ledger
from .models import BackboneFetch, ModelVersion, Peer

log = logging.getLogger(__name__)

SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")
PROGRESS_EVERY_S = 1.0
HTTP_CHUNK = 64 * 1024


class FetchError(Exception):
    pass


class ActivationError(Exception):
    pass


# --- Paths and state ----------------------------------------------------------------------------


def _safe(value, what):
    if not SAFE_NAME_RE.match(value or "") or ".." in value:
        raise FetchError(f"{what} {value!r} is not a safe file name (letters, digits, . _ + -)")
    return value


def file_path(version):
    return (
        Path(settings.MODEL_CACHE_DIR) / "backbones" / _safe(version.name, "version name")
        / _safe(version.file_name, "file name")
    )


def fetch_state(version):
    state, _ = BackboneFetch.objects.get_or_create(version=version)
    return state


def is_ready(version):
    """The version's verified file is in place (checked by state and size, not re-hashed)."""
    state = BackboneFetch.objects.filter(version=version).first()
    if state is None or state.state != BackboneFetch.State.READY:
        return False
    try:
        path = file_path(version)
    except FetchError:
        return False
    return path.exists() and (not version.size_bytes or path.stat().st_size == version.size_bytes)


def active_backbone_path():
    """Path of the active backbone's verified file, or None when no version is active or its file
    is not fetched yet (the worker then keeps what it serves, or its default backbone).

    The inference worker checks this between batches (or on a `backbone` notification) and, when
    it changes, loads the new engine beside the old one, sends new requests to the new engine and
    drops the old one once its in-flight requests have finished."""
    version = ModelVersion.active()
    if version is None or not is_ready(version):
        return None
    return file_path(version)


def sha256_file(path, chunk=blobstore.CHUNK):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- Fetch --------------------------------------------------------------------------------------


def _claim(version):
    state = fetch_state(version)
    now = timezone.now()
    stale = now - timedelta(seconds=BackboneFetch.STALE_AFTER_S)
    claimed = (
        BackboneFetch.objects.filter(pk=state.pk)
        .exclude(state=BackboneFetch.State.FETCHING, updated__gt=stale)
        .update(state=BackboneFetch.State.FETCHING, error="", source="", bytes_done=0, updated=now)
    )
    if not claimed:
        raise FetchError(f"{version.name} is already being fetched")
    return state


def _finish(row, **fields):
    fields["updated"] = timezone.now()
    BackboneFetch.objects.filter(pk=row.pk).update(**fields)


def check_disk_space(version, directory, already=0):
    """FetchError unless the directory's file system has room for the rest of the file plus the
    configured margin."""
    free = shutil.disk_usage(directory).free
    needed = max(0, version.size_bytes - already) + settings.R3MES_MODEL_DISK_MARGIN_BYTES
    if free < needed:
        raise FetchError(
            f"not enough disk space in {directory}: {version.name} needs {_gib(needed)} "
            f"({_gib(version.size_bytes)} + {_gib(settings.R3MES_MODEL_DISK_MARGIN_BYTES)} margin), {_gib(free)} free"
        )


def _gib(n):
    return f"{n / 1024**3:.2f} GiB"


class _Writer:
    """Appends chunks to the .part file, hashing and reporting progress (tqdm + database)."""

    def __init__(self, version, state, part, progress, source, resume):
        self.version, self.state, self.part, self.source = version, state, part, source
        self.digest = hashlib.sha256()
        self.done = 0
        if resume and part.exists():
            with open(part, "rb") as handle:
                while block := handle.read(blobstore.CHUNK):
                    self.digest.update(block)
                    self.done += len(block)
            mode = "ab"
        else:
            mode = "wb"
        self.handle = open(part, mode)
        self.bar = None
        if progress is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=version.size_bytes or None, initial=self.done, unit="B", unit_scale=True,
                            unit_divisor=1024, desc=f"{version.name} ({source})", file=progress)
        self.last_report = 0.0

    def write(self, block):
        self.handle.write(block)
        self.digest.update(block)
        self.done += len(block)
        metrics.backbone_fetch_bytes.labels(self.source).inc(len(block))
        if self.bar is not None:
            self.bar.update(len(block))
        if self.version.size_bytes and self.done > self.version.size_bytes:
            raise FetchError(f"{self.source} sent more than the expected {self.version.size_bytes} bytes")
        now = time.monotonic()
        if now - self.last_report >= PROGRESS_EVERY_S:
            self.last_report = now
            _finish(self.state, bytes_done=self.done)

    def close(self):
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if self.bar is not None:
            self.bar.close()
        _finish(self.state, bytes_done=self.done)


def _from_url(version, state, part, progress):
    resume_from = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={resume_from}-"} if resume_from else {}
    timeout = (settings.R3MES_PEER_CONNECT_TIMEOUT, settings.R3MES_MODEL_FETCH_TIMEOUT)
    try:
        response = requests.get(version.source_url, stream=True, timeout=timeout, headers=headers)
    except requests.RequestException as exc:
        raise FetchError(f"cannot download {version.source_url}: {exc.__class__.__name__}: {exc}") from None
    with response:
        if response.status_code == 416 and resume_from:  # the partial file is already complete
            writer = _Writer(version, state, part, None, "source", resume=True)
            writer.close()
            return writer
        if response.status_code not in (200, 206):
            raise FetchError(f"{version.source_url} answered HTTP {response.status_code}")
        writer = _Writer(version, state, part, progress, "source", resume=response.status_code == 206)
        try:
            # Small chunks: a broken connection loses at most one chunk of progress.
            for block in response.iter_content(HTTP_CHUNK):
                writer.write(block)
        except requests.RequestException as exc:
            raise FetchError(f"download from {version.source_url} broke off: {exc} (the partial file is kept to resume)") from None
        finally:
            writer.close()
        return writer


def _from_blob_store(version, state, part, progress):
    if not blobstore.exists(version.blob_cid):
        raise FetchError(f"blob {version.blob_cid} is not in the local blob store")
    writer = _Writer(version, state, part, progress, "blob store", resume=False)
    try:
        for block in blobstore.iter_verified(version.blob_cid):
            writer.write(block)
    except blobstore.CorruptBlob as exc:
        metrics.corrupt_blobs.labels("local").inc()
        raise FetchError(str(exc)) from None
    finally:
        writer.close()
    return writer


def _from_peers(version, state, part, progress):
    errors = []
    for peer in Peer.objects.filter(enabled=True):
        url = peer.endpoint(f"/api/blobs/{version.blob_cid}")
        try:
            response = requests.get(url, stream=True, timeout=(settings.R3MES_PEER_CONNECT_TIMEOUT, settings.R3MES_MODEL_FETCH_TIMEOUT))
        except requests.RequestException as exc:
            errors.append(f"{peer.name}: {exc.__class__.__name__}")
            continue
        with response:
            if response.status_code != 200:
                errors.append(f"{peer.name}: HTTP {response.status_code}")
                continue
            writer = _Writer(version, state, part, progress, f"peer {peer.name}", resume=False)
            try:
                for block in response.iter_content(blobstore.CHUNK):
                    writer.write(block)
            except (requests.RequestException, FetchError) as exc:
                errors.append(f"{peer.name}: {exc}")
                writer.close()
                continue
            writer.close()
            if writer.digest.hexdigest() == version.sha256:
                return writer
            errors.append(f"{peer.name}: content does not match sha256")
    raise FetchError("no peer could serve it" + (f" ({'; '.join(errors)})" if errors else " (no enabled peers)"))


def sources(version):
    """(label, downloader) in the order they are tried: the seed's hybrid order, source first."""
    found = []
    if version.source_url:
        found.append(("source URL", _from_url))
    if version.blob_cid:
        found.append(("blob store", _from_blob_store))
        found.append(("peers", _from_peers))
    return found


def fetch(version, *, progress=None):
    """Downloads and verifies the version's file; returns its path. `progress`: a stream for a
    tqdm bar (None: no bar). Raises FetchError naming every source that failed."""
    target = file_path(version)
    expected = (version.sha256 or "").lower()
    if not re.match(r"^[0-9a-f]{64}$", expected):
        raise FetchError(f"{version.name} has no valid sha256 to verify against")
    if version.blob_cid:
        try:
            if blobstore.sha256_hex_from_cid(version.blob_cid) != expected:
                raise FetchError(f"{version.name}'s blob CID does not name the same content as its sha256")
        except blobstore.InvalidCid as exc:
            raise FetchError(f"{version.name}: {exc}") from None
    if not sources(version):
        raise FetchError(f"{version.name} has neither a source URL nor a blob CID")
    state = _claim(version)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if sha256_file(target) == expected:
                _finish(state, state=BackboneFetch.State.READY, source="already present", bytes_done=target.stat().st_size)
                return target
            log.warning("existing %s does not match its sha256; fetching it again", target)
            target.unlink()
        # The source download keeps its partial file between attempts (resume); fallbacks write
        # to their own temporary file so they never clobber it.
        resumable = target.with_name(target.name + ".part")
        check_disk_space(version, target.parent, already=resumable.stat().st_size if resumable.exists() else 0)
        errors = []
        for label, download in sources(version):
            part = resumable if label == "source URL" else target.with_name(target.name + ".fallback")
            try:
                writer = download(version, state, part, progress)
            except FetchError as exc:
                errors.append(f"{label}: {exc}")
                if part is not resumable:
                    part.unlink(missing_ok=True)
                continue
            got = writer.digest.hexdigest()
            if got != expected:
                part.unlink(missing_ok=True)
                errors.append(f"{label}: sha256 mismatch (got {got}, expected {expected}); the file was deleted")
                log.error("backbone %s from %s failed verification; deleted", version.name, label)
                continue
            os.replace(part, target)
            resumable.unlink(missing_ok=True)
            _finish(state, state=BackboneFetch.State.READY, source=label, error="", bytes_done=writer.done)
            log.info("backbone %s fetched from %s and verified", version.name, label)
            return target
        raise FetchError(f"could not fetch {version.name}: " + " | ".join(errors))
    except FetchError as exc:
        _finish(state, state=BackboneFetch.State.FAILED, error=str(exc))
        raise
    except BaseException as exc:
        _finish(state, state=BackboneFetch.State.FAILED, error=f"interrupted: {exc.__class__.__name__}: {exc}")
        raise


# --- Activation ---------------------------------------------------------------------------------


def _ledger_fields(version):
    return {"name": version.name, "file_name": version.file_name, "sha256": version.sha256,
            "size_bytes": version.size_bytes, "blob_cid": version.blob_cid, "architecture": version.architecture}


def queue_fetch(version_id):
    """Queues the fetch task; False (logged) when the broker cannot be reached."""
    from kombu.exceptions import OperationalError

    from .chain_tasks import fetch_model_version

    try:
        fetch_model_version.delay(version_id)
    except OperationalError as exc:
        log.warning("could not queue the fetch of backbone version %s (broker down?): %s", version_id, exc)
        return False
    return True


def activate(version, *, require_file=True):
    """Makes `version` the active backbone and records it on the ledger. With `require_file`
    (operators), its verified file must already be fetched; governance passes False: the fetch is
    then queued, and `active_backbone_path()` stays None until the file is ready."""
    with transaction.atomic():
        version = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if version.status == ModelVersion.Status.ACTIVE:
            raise ActivationError(f"{version.name} is already the active backbone")
        if require_file and not is_ready(version):
            raise ActivationError(f"{version.name} is not fetched yet; run `r3mes model fetch {version.name}` first")
        current = ModelVersion.active()
        if current is not None:
            current.status = ModelVersion.Status.AVAILABLE
            current.save(update_fields=["status"])
        version.status = ModelVersion.Status.ACTIVE
        version.activated_at = timezone.now()
        version.previous = current
        version.save(update_fields=["status", "activated_at", "previous"])
        ledger.record("backbone_activated", {**_ledger_fields(version), "previous": current.name if current else None})
        if not is_ready(version):
            transaction.on_commit(functools.partial(queue_fetch, version.pk))
    log.info("backbone %s activated (previous: %s)", version.name, current)
    return version


def rollback():
    """Returns to the version the active one replaced; the active one is retired."""
    with transaction.atomic():
        current = ModelVersion.objects.select_for_update().filter(status=ModelVersion.Status.ACTIVE).first()
        if current is None:
            raise ActivationError("no backbone version is active, so there is nothing to roll back")
        target = current.previous
        if target is None:
            raise ActivationError(f"{current.name} has no previous version to roll back to")
        if not is_ready(target):
            raise ActivationError(f"the previous version {target.name} is not fetched; run `r3mes model fetch {target.name}` first")
        current.status = ModelVersion.Status.RETIRED
        current.save(update_fields=["status"])
        target.status = ModelVersion.Status.ACTIVE
        target.activated_at = timezone.now()
        target.save(update_fields=["status", "activated_at"])
        ledger.record("backbone_rolled_back", {**_ledger_fields(target), "from": current.name})
    log.info("backbone rolled back from %s to %s", current.name, target.name)
    return target
