from django.urls import include, path

from . import views

urlpatterns = [
    path("", include("mining.chain_urls")),
    path("mining/", views.dashboard, name="mining"),
    path("mining/datasets/", views.dataset_list, name="mining-datasets"),
    path("mining/datasets/<int:pk>/", views.dataset_detail, name="mining-dataset"),
    path("mining/rounds/", views.round_list, name="mining-rounds"),
    path("mining/rounds/<int:pk>/", views.round_detail, name="mining-round"),
    path("mining/rounds/<int:pk>/progress", views.round_progress, name="mining-round-progress"),
    path("mining/rounds/<int:pk>/start", views.round_start, name="mining-round-start"),
    path("mining/leaderboard/", views.leaderboard, name="mining-leaderboard"),
    path("api/mining/datasets", views.api_dataset_upload, name="api-mining-datasets"),
    path("api/mining/rounds/<int:pk>", views.api_round, name="api-mining-round"),
    path("api/mining/rounds/<int:pk>/submissions", views.api_submit, name="api-mining-submissions"),
]
