"""The messages the web process and the inference worker exchange over the channel layer.

Requests go to the shared channel `inference`, where any worker may take them; a worker answers
from its own channel name (`worker` in every reply), so follow-ups such as cancels reach the worker
that holds the sequence. Every reply goes to the `reply_channel` the request named.
"""

import asyncio
import time

from channels.layers import get_channel_layer

INFERENCE_CHANNEL = "inference"


async def ping_worker(timeout):
    """Asks any inference worker for its health; returns its reply dict or raises TimeoutError."""
    layer = get_channel_layer()
    reply_channel = await layer.new_channel("health.")
    sent_at = time.time()
    await layer.send(INFERENCE_CHANNEL, {"type": "health.ping", "reply_channel": reply_channel, "sent_at": sent_at})
    # A worker that was down leaves older pings queued; their replies went to other channels,
    # so the first reply here is for this ping.
    async with asyncio.timeout(timeout):
        reply = await layer.receive(reply_channel)
    reply["round_trip_ms"] = round((time.time() - sent_at) * 1000, 1)
    return reply
