import importlib

# Users first (the others need the admin); `seed_last` hooks then see everything the others made.
DEMO_MODULES = ["governance.demo", "inference.demo", "rag.demo", "mining.demo"]


def register(subparsers):
    demo = subparsers.add_parser("demo", help="Create the demo admin, users and data (idempotent)")
    demo.set_defaults(handler=seed_demo)
    register_wait(subparsers)


def seed_demo(command, options):
    modules = []
    for name in DEMO_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    for module in modules:
        module.seed(command.stdout)
    for module in modules:
        if hasattr(module, "seed_last"):
            module.seed_last(command.stdout)


def register_wait(subparsers):
    wait = subparsers.add_parser("wait-redis", help="Wait until Redis answers (used at start-up)")
    wait.add_argument("--timeout", type=float, default=30)
    wait.set_defaults(handler=wait_redis)


def wait_redis(command, options):
    import time

    import redis
    from django.conf import settings
    from django.core.management.base import CommandError

    deadline = time.monotonic() + options["timeout"]
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    while True:
        try:
            client.ping()
            return
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                raise CommandError(f"Redis at {settings.REDIS_URL} did not answer within {options['timeout']} s: {exc}")
            time.sleep(0.2)
