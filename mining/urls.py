from django.urls import include, path

urlpatterns = [
    path("", include("mining.chain_urls")),
]
