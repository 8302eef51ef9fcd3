import sys

from django.core.management.base import CommandError

from . import ledger


def register(subparsers):
    chain = subparsers.add_parser("chain", help="The ledger: verify it, sync it from peers")
    verbs = chain.add_subparsers(dest="chain_verb", required=True, metavar="ACTION")
    verify = verbs.add_parser("verify", help="Re-check links, Merkle roots and signatures; report the first bad block")
    verify.add_argument("--peer", help="Verify the replicated chain of this peer (name) instead of this node's")
    verify.set_defaults(handler=chain_verify)
    sync = verbs.add_parser("sync", help="Pull new blocks from the enabled peers (or one) now")
    sync.add_argument("--peer", help="Only this peer (name)")
    sync.set_defaults(handler=chain_sync)
    node = verbs.add_parser("node", help="Print this node's public key (peers pin it)")
    node.set_defaults(handler=chain_node)

    model = subparsers.add_parser("model", help="Backbone versions: fetch, activate, roll back")
    verbs = model.add_subparsers(dest="model_verb", required=True, metavar="ACTION")
    fetch = verbs.add_parser("fetch", help="Download and verify a version (source URL, then blob store, then peers)")
    fetch.add_argument("version")
    fetch.add_argument("--no-progress", action="store_true")
    fetch.set_defaults(handler=model_fetch)
    activate = verbs.add_parser("activate", help="Make a fetched version the active backbone")
    activate.add_argument("version")
    activate.set_defaults(handler=model_activate)
    rollback = verbs.add_parser("rollback", help="Return to the version the active one replaced")
    rollback.set_defaults(handler=model_rollback)
    listing = verbs.add_parser("list", help="List versions with their state")
    listing.set_defaults(handler=model_list)


def _peer(name):
    from .models import Peer

    peer = Peer.objects.filter(name=name).first()
    if peer is None:
        raise CommandError(f"No peer named {name!r}; configure peers in the admin")
    return peer


def chain_verify(command, options):
    origin = _peer(options["peer"]) if options["peer"] else None
    report = ledger.verify_chain(origin)
    if not report.ok:
        raise CommandError(report.summary())
    command.stdout.write(report.summary())


def chain_sync(command, options):
    from . import chain_sync as sync
    from .models import Peer

    peers = [_peer(options["peer"])] if options["peer"] else list(Peer.objects.filter(enabled=True))
    if not peers:
        command.stdout.write("No enabled peers; configure peers in the admin")
        return
    failed = []
    for peer in peers:
        result = sync.sync_peer(peer)
        command.stdout.write(result.summary())
        if result.error and not result.skipped:
            failed.append(peer.name)
    if failed:
        raise CommandError(f"sync failed for {', '.join(failed)}")


def chain_node(command, options):
    from . import keys

    command.stdout.write(keys.node_public_key_hex())


def _version(name):
    from .models import ModelVersion

    version = ModelVersion.objects.filter(name=name).first()
    if version is None:
        raise CommandError(f"No model version named {name!r}; add it in the admin (Mining › Model versions)")
    return version


def model_fetch(command, options):
    from . import model_versions

    version = _version(options["version"])
    try:
        path = model_versions.fetch(version, progress=None if options["no_progress"] else sys.stderr)
    except model_versions.FetchError as exc:
        raise CommandError(str(exc)) from None
    command.stdout.write(f"{version.name}: verified file at {path}")


def model_activate(command, options):
    from . import model_versions

    version = _version(options["version"])
    try:
        model_versions.activate(version)
    except model_versions.ActivationError as exc:
        raise CommandError(str(exc)) from None
    command.stdout.write(f"{version.name} is now the active backbone (recorded on the ledger)")


def model_rollback(command, options):
    from . import model_versions

    try:
        target = model_versions.rollback()
    except model_versions.ActivationError as exc:
        raise CommandError(str(exc)) from None
    command.stdout.write(f"Rolled back to {target.name} (recorded on the ledger)")


def model_list(command, options):
    from . import model_versions
    from .models import ModelVersion

    for version in ModelVersion.objects.all():
        ready = "fetched" if model_versions.is_ready(version) else "not fetched"
        command.stdout.write(f"{version.name}\t{version.status}\t{ready}\t{version.file_name}")
