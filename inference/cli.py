import _thread
import logging
import signal
import threading

from channels.layers import get_channel_layer
from channels.routing import get_default_application
from channels.worker import Worker

from .protocol import INFERENCE_CHANNEL
from .worker import drain, start_loading, state

log = logging.getLogger(__name__)


def register(subparsers):
    worker = subparsers.add_parser("worker", help="Run the inference worker (holds the model, serves the `inference` channel)")
    worker.set_defaults(handler=run_worker)


def run_worker(command, options):
    from django.conf import settings

    def drain_then_exit():
        drain(settings.R3MES_DRAIN_GRACE_S)
        _thread.interrupt_main()  # Channels' server exits cleanly on KeyboardInterrupt

    def stop(signum, frame):
        # SIGTERM (honcho, systemd): no new requests, running answers get the grace period, the
        # rest end with an error frame; the event loop keeps sending frames meanwhile.
        if not state.draining:
            log.info("draining: %s s grace for running answers", settings.R3MES_DRAIN_GRACE_S)
            state.draining = True
            threading.Thread(target=drain_then_exit, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    start_loading()
    log.info("inference worker listening on channel %r", INFERENCE_CHANNEL)
    Worker(
        application=get_default_application(),
        channels=[INFERENCE_CHANNEL],
        channel_layer=get_channel_layer(),
    ).run()
    log.info("inference worker stopped")
