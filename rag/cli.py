from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from .models import Collection
from .snapshots import SnapshotError, export_collection, import_snapshot


def register(subparsers):
    rag = subparsers.add_parser("rag", help="Document collections: snapshots")
    verbs = rag.add_subparsers(dest="rag_verb", required=True, metavar="ACTION")
    export = verbs.add_parser("export", help="Write a collection's passages, vectors and metadata to one content-addressed file")
    export.add_argument("collection", help="Collection id, or name (with --owner when names clash)")
    export.add_argument("--owner", default="", help="Username of the collection's owner")
    export.add_argument("--out", default=".", help="Directory for the snapshot file (default: current directory)")
    export.set_defaults(handler=export_command)
    imp = verbs.add_parser("import", help="Create a collection from a snapshot file, verified by its hash")
    imp.add_argument("file")
    imp.add_argument("--owner", required=True, help="Username that will own the imported collection")
    imp.add_argument("--name", default="", help="Collection name (default: the snapshot's)")
    imp.set_defaults(handler=import_command)


def _find_collection(ref, owner):
    collections = Collection.objects.all()
    if owner:
        collections = collections.filter(owner__username=owner)
    matches = list(collections.filter(pk=int(ref))) if ref.isdigit() else list(collections.filter(name=ref))
    if not matches:
        raise CommandError(f"No collection {ref!r}" + (f" owned by {owner}" if owner else ""))
    if len(matches) > 1:
        raise CommandError(f"Several collections are named {ref!r}; give its id or --owner")
    return matches[0]


def export_command(command, options):
    collection = _find_collection(options["collection"], options["owner"])
    path = export_collection(collection, options["out"])
    command.stdout.write(f"Exported collection {collection.name} ({collection.documents.filter(status='ready').count()} documents) to {path}")


def import_command(command, options):
    owner = get_user_model().objects.filter(username=options["owner"]).first()
    if owner is None:
        raise CommandError(f"No user {options['owner']!r}")
    try:
        collection, documents, chunks = import_snapshot(options["file"], owner, options["name"] or None)
    except SnapshotError as exc:
        raise CommandError(str(exc)) from None
    command.stdout.write(f"Imported {documents} documents ({chunks} passages) into collection {collection.name} (id {collection.pk})")
