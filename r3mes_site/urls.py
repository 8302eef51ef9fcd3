from django.contrib import admin
from django.urls import include, path

from . import views

admin.site.site_header = "R3MES administration"
admin.site.site_title = "R3MES admin"
admin.site.index_title = "Operate the node"

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("startupz", views.startupz, name="startupz"),
    path("metrics", views.metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("", include("governance.urls")),
    path("", include("inference.urls")),
    path("", include("rag.urls")),
    path("", include("mining.urls")),
]
