import logging
import signal

from channels.layers import get_channel_layer
from channels.routing import get_default_application
from channels.worker import Worker

from .protocol import INFERENCE_CHANNEL
from .worker import start_loading, state

log = logging.getLogger(__name__)


def register(subparsers):
    worker = subparsers.add_parser("worker", help="Run the inference worker (holds the model, serves the `inference` channel)")
    worker.set_defaults(handler=run_worker)


def run_worker(command, options):
    def stop(signum, frame):
        # Channels' server exits cleanly on KeyboardInterrupt; SIGTERM (honcho, systemd) gets the same.
        state.draining = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    start_loading()
    log.info("inference worker listening on channel %r", INFERENCE_CHANNEL)
    Worker(
        application=get_default_application(),
        channels=[INFERENCE_CHANNEL],
        channel_layer=get_channel_layer(),
    ).run()
    log.info("inference worker stopped")
