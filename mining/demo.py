"""A pending training dataset for the demo (the starter coding examples), so a fresh node has
something to vote on in governance and, once approved, to mine a round on."""

from pathlib import Path

from governance.models import User

from . import actions
from .models import Dataset

NAME = "Coding starter examples"
SOURCE = Path(__file__).resolve().parent.parent / "inference" / "starter_data" / "coding.jsonl"


def seed(out):
    alice = User.objects.filter(username="alice").first()
    if alice is None or Dataset.objects.filter(name=NAME).exists():
        return
    dataset = actions.do_upload_dataset(
        alice, name=NAME, expert="coding", fmt=Dataset.Format.JSONL, data=SOURCE.read_bytes(),
        description="Instruction/response pairs written for the starter coding expert.",
    )
    out.write(f"Demo dataset: “{dataset.name}” ({dataset.examples} examples, pending governance)")
