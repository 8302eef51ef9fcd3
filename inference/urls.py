from django.urls import path

from . import api, views

urlpatterns = [
    path("playground/", views.playground, name="playground"),
    path("playground/c/<int:pk>/", views.playground, name="playground-conversation"),
    path("playground/c/<int:pk>/rename/", views.rename_conversation, name="playground-rename"),
    path("playground/c/<int:pk>/delete/", views.delete_conversation, name="playground-delete"),
    path("playground/m/<int:pk>/feedback/", views.feedback, name="playground-feedback"),
    path("v1/chat/completions", api.chat_completions, name="v1-chat-completions"),
    path("v1/models", api.models, name="v1-models"),
    path("api/inference/experts", api.experts, name="api-inference-experts"),
    path("api/inference/stats", api.stats, name="api-inference-stats"),
    path("api/inference/warmup", api.warmup, name="api-inference-warmup"),
    path("api/inference/adapters/preload", api.preload, name="api-inference-preload"),
]
