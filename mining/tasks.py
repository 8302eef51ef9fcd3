from .chain_tasks import *  # noqa: F401,F403  (Celery autodiscovery imports only tasks.py)
