"""What a proposal can target, by kind: how to find eligible targets, describe them and execute a
passed proposal. A registry dict; each entry names plain functions.

A proposal that does not pass leaves its target as it was (the issue's rule), so a rejected dataset
or adapter can be improved and proposed again."""

from dataclasses import dataclass
from typing import Callable

from django.apps import apps
from django.template.defaultfilters import filesizeformat

from mining import ledger, model_versions


@dataclass(frozen=True)
class TargetKind:
    label: str
    model: str  # "app_label.ModelName"
    eligible_status: str  # the target status a proposal may be opened on
    ineligible_reason: str
    execute: Callable  # called with the target when the proposal passes
    facts: Callable  # target -> [(label, value)] for pages and the API

    def model_class(self):
        return apps.get_model(self.model)

    def candidates(self):
        return self.model_class().objects.filter(status=self.eligible_status)


def _approve_adapter(adapter):
    # The router reads Adapter.servable() from the database per request: no restart needed.
    adapter.approve()
    if adapter.blob_cid:
        ledger.announce_adapter_approved(adapter)  # peers replicating the ledger approve it too


def _approve_dataset(dataset):
    dataset.approve()
    if dataset.blob_cid:
        ledger.announce_dataset_approved(dataset)


def _activate_backbone(version):
    # Records the activation on the ledger and queues the file's fetch if this node lacks it.
    model_versions.activate(version, require_file=False)


def _adapter_facts(adapter):
    facts = [
        ("Expert", adapter.expert),
        ("Version", adapter.version),
        ("Status", adapter.status),
        ("Rank / alpha", f"{adapter.rank} / {adapter.alpha:g}"),
        ("Target modules", ", ".join(adapter.target_modules) or "—"),
        ("Size", filesizeformat(adapter.size_bytes)),
        ("SHA-256", adapter.sha256),
        ("Blob CID", adapter.blob_cid or "—"),
        ("Base model", adapter.base_model or "—"),
    ]
    facts += [(f"Metric: {name}", value) for name, value in sorted((adapter.metrics or {}).items())]
    return facts


def _dataset_facts(dataset):
    return [
        ("Name", dataset.name),
        ("Expert", dataset.expert),
        ("Format", dataset.format),
        ("Status", dataset.status),
        ("Examples", dataset.examples),
        ("Size", filesizeformat(dataset.size_bytes)),
        ("SHA-256", dataset.sha256),
        ("Blob CID", dataset.blob_cid),
        ("Description", dataset.description or "—"),
    ]


PREVIEW_LINES = 5
PREVIEW_LINE_CHARS = 300


def dataset_preview(dataset):
    """The first lines of the dataset as (lines, problem), read from the blob store after its
    content is verified against the CID, so a page never shows bytes that are not the dataset."""
    from mining import blobstore

    try:
        blobstore.verify(dataset.blob_cid)
        lines = []
        with open(blobstore.path_for(dataset.blob_cid), "rb") as handle:
            while len(lines) < PREVIEW_LINES:
                raw = handle.readline(64 * 1024)
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line[:PREVIEW_LINE_CHARS] + ("…" if len(line) > PREVIEW_LINE_CHARS else ""))
        return lines, None
    except blobstore.BlobError as exc:
        return [], str(exc)


def _backbone_facts(version):
    return [
        ("Name", version.name),
        ("Architecture", version.architecture),
        ("Status", version.status),
        ("File", version.file_name),
        ("Size", filesizeformat(version.size_bytes)),
        ("SHA-256", version.sha256),
        ("Source", version.source_url or "—"),
        ("Description", version.description or "—"),
    ]


TARGETS = {
    "adapter": TargetKind(
        label="Adapter version",
        model="inference.Adapter",
        eligible_status="candidate",
        ineligible_reason="only candidate adapter versions can be proposed",
        execute=_approve_adapter,
        facts=_adapter_facts,
    ),
    "dataset": TargetKind(
        label="Training dataset",
        model="mining.Dataset",
        eligible_status="pending",
        ineligible_reason="only pending datasets can be proposed",
        execute=_approve_dataset,
        facts=_dataset_facts,
    ),
    "backbone": TargetKind(
        label="Backbone version",
        model="mining.ModelVersion",
        eligible_status="available",
        ineligible_reason="only available (not active, not retired) backbone versions can be proposed",
        execute=_activate_backbone,
        facts=_backbone_facts,
    ),
}


def get_target(kind, target_id):
    """The target object, or None if it no longer exists."""
    return TARGETS[kind].model_class().objects.filter(pk=target_id).first()
