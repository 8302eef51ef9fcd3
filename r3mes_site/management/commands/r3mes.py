"""`manage.py r3mes <verb>`: the home of every R3MES command-line verb.

Each app contributes its verbs from `<app>/cli.py`, a module with `register(subparsers)` that adds
sub-parsers whose defaults carry `handler=function(command, options)`.
"""

import importlib

from django.core.management.base import BaseCommand

CLI_MODULES = ["r3mes_site.cli", "governance.cli", "inference.cli", "rag.cli", "mining.cli"]


class Command(BaseCommand):
    help = "R3MES command line: run `manage.py r3mes --help` for the verbs."

    def add_arguments(self, parser):
        subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
        for name in CLI_MODULES:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name == name:  # the app has no verbs (yet)
                    continue
                raise
            module.register(subparsers)

    def handle(self, *args, **options):
        return options["handler"](self, options)
