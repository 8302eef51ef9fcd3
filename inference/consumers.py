from channels.consumer import AsyncConsumer

from .worker import state


class InferenceWorkerConsumer(AsyncConsumer):
    """Receives the `inference` channel's messages in the worker process."""

    async def health_ping(self, message):
        reply = state.health()
        reply.update({"type": "health.pong", "worker": self.channel_name})
        await self.channel_layer.send(message["reply_channel"], reply)
