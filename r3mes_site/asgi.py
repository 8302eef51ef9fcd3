"""ASGI entry point: HTTP (Django), websockets (origin-checked, authenticated) and the
`inference` worker channel."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r3mes_site.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from inference.consumers import InferenceWorkerConsumer  # noqa: E402
from inference.protocol import INFERENCE_CHANNEL  # noqa: E402
from inference.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        "channel": ChannelNameRouter({INFERENCE_CHANNEL: InferenceWorkerConsumer.as_asgi()}),
    }
)
