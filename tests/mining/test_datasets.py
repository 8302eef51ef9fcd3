import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from mining import blobstore
from mining.datasets import DatasetInvalid, parse_dataset
from mining.models import Dataset

GOOD = b"\n".join(json.dumps(x).encode() for x in [
    {"instruction": "Add 2 and 3", "response": "5"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"instruction": "Translate", "input": "bonjour", "response": "hello"},
]) + b"\n"


def test_jsonl_instruction_and_chat_lines_are_accepted():
    examples = parse_dataset(GOOD, "jsonl")
    assert len(examples) == 3
    assert examples[0] == {"instruction": "Add 2 and 3", "response": "5"}
    assert examples[1]["messages"][-1] == {"role": "assistant", "content": "Hello!"}
    assert examples[2]["input"] == "bonjour"


def test_every_bad_line_is_reported_with_its_number():
    data = GOOD + b'{"instruction": "x"}\nnot json\n[1, 2]\n{"messages": [{"role": "user", "content": "q"}]}\n' \
                  b'{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    with pytest.raises(DatasetInvalid) as info:
        parse_dataset(data, "jsonl")
    errors = info.value.errors
    assert errors[0].startswith("line 4:") and "missing response" in errors[0]
    assert errors[1].startswith("line 5: not valid JSON")
    assert errors[2].startswith("line 6:") and "JSON object" in errors[2]
    assert errors[3].startswith("line 7:") and "last message must be the assistant" in errors[3]
    assert errors[4].startswith("line 8:") and "role must be one of" in errors[4]


def test_empty_binary_and_non_utf8_datasets_are_refused():
    for data, fmt, message in [(b"", "jsonl", "empty"), (b"\n\n  \n", "text", "empty"),
                               (b"\x00\x01binary", "text", "binary"), (b"ok\n\xff\xfe bad", "text", "line 2: not valid UTF-8")]:
        with pytest.raises(DatasetInvalid, match=message):
            parse_dataset(data, fmt)


def test_plain_text_becomes_one_example_per_paragraph():
    examples = parse_dataset(b"First paragraph.\nStill first.\n\nSecond one.\n", "text")
    assert [e["messages"][0]["content"] for e in examples] == ["First paragraph.\nStill first.", "Second one."]


def test_size_limit(settings):
    settings.MINING_MAX_DATASET_BYTES = 10
    with pytest.raises(DatasetInvalid, match="limit is 10"):
        parse_dataset(GOOD, "jsonl")


@pytest.mark.django_db
def test_upload_page_stores_a_pending_dataset_blob_and_shows_a_preview(alice_client):
    response = alice_client.post(reverse("mining-datasets"), {
        "name": "sums", "expert": "math", "format": "auto", "description": "",
        "file": SimpleUploadedFile("sums.jsonl", GOOD)})
    dataset = Dataset.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("mining-dataset", args=[dataset.pk])
    assert dataset.status == "pending" and dataset.examples == 3 and dataset.format == "jsonl"
    assert blobstore.read_bytes(dataset.blob_cid) == GOOD
    page = alice_client.get(reverse("mining-dataset", args=[dataset.pk]))
    assert b"Add 2 and 3" in page.content and b"Hello!" in page.content and b"pending" in page.content


@pytest.mark.django_db
def test_upload_page_shows_line_errors_and_stores_nothing(alice_client):
    response = alice_client.post(reverse("mining-datasets"), {
        "name": "bad", "expert": "math", "format": "jsonl", "file": SimpleUploadedFile("b.jsonl", b'{"a": 1}\n')})
    assert response.status_code == 200 and b"line 1:" in response.content
    assert not Dataset.objects.exists()


@pytest.mark.django_db
def test_anonymous_upload_is_redirected_to_login(client):
    response = client.post(reverse("mining-datasets"), {"name": "x"})
    assert response.status_code == 302 and "login" in response["Location"]


@pytest.mark.django_db
def test_api_upload_creates_a_dataset_and_reports_bad_lines(api_client):
    created = api_client.post("/api/mining/datasets", {
        "name": "sums", "expert": "math", "file": SimpleUploadedFile("sums.jsonl", GOOD)})
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["status"] == "pending" and body["examples"] == 3 and body["blob_cid"].startswith("bafkrei")
    bad = api_client.post("/api/mining/datasets", {
        "name": "bad", "expert": "math", "format": "jsonl", "file": SimpleUploadedFile("b.jsonl", GOOD + b"oops\n")})
    assert bad.status_code == 422 and "line 4: not valid JSON" in bad.json()["error"]["message"]
    missing = api_client.post("/api/mining/datasets", {"name": "x", "expert": "math"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    assert Dataset.objects.count() == 1


@pytest.mark.django_db
def test_api_upload_needs_a_token(client):
    response = client.post("/api/mining/datasets", {"name": "x"})
    assert response.status_code == 401


@pytest.mark.django_db
def test_dataset_approval_makes_it_minable(alice):
    cid, size = blobstore.put_bytes(GOOD)
    dataset = Dataset.objects.create(name="d", expert="math", format="jsonl", blob_cid=cid, sha256="0" * 64,
                                     size_bytes=size, examples=3)
    assert not dataset.is_minable
    dataset.approve()
    dataset.refresh_from_db()
    assert dataset.is_minable and dataset.approved_at is not None
    assert len(dataset.load_examples()) == 3


def test_demo_seeds_one_pending_dataset_that_governance_can_target(alice, bob):
    from io import StringIO

    from django.core.management import call_command

    from governance.models import Proposal
    from mining.models import Dataset

    out = StringIO()
    call_command("r3mes", "demo", stdout=out)
    call_command("r3mes", "demo", stdout=out)
    dataset = Dataset.objects.get(name="Coding starter examples")
    assert dataset.status == "pending" and dataset.examples >= 40
    proposal = Proposal.objects.get()
    assert proposal.kind == "dataset" and proposal.target_id == dataset.pk and proposal.status == "voting"
