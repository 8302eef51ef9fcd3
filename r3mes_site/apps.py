from django.apps import AppConfig


class R3mesSiteConfig(AppConfig):
    name = "r3mes_site"
    verbose_name = "R3MES site"
