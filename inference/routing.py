"""Websocket routes of the inference app (the playground's chat socket)."""

websocket_urlpatterns = []
