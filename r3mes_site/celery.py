import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r3mes_site.settings")

app = Celery("r3mes_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
