import importlib

# governance last: its demo proposal needs the adapters and datasets the others create.
DEMO_MODULES = ["inference.demo", "rag.demo", "mining.demo", "governance.demo"]


def register(subparsers):
    demo = subparsers.add_parser("demo", help="Create the demo admin, users and data (idempotent)")
    demo.set_defaults(handler=seed_demo)
    register_wait(subparsers)


def seed_demo(command, options):
    for name in DEMO_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.seed(command.stdout)


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
