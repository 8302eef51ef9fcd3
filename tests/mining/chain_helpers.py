"""Helpers for the ledger tests: a peer chain built with its own key, a small threaded HTTP server
standing in for a peer or a model download site (127.0.0.1, real sockets), and a real second R3MES
instance (daphne in a subprocess)."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mining import ledger

REPO = Path(__file__).resolve().parents[2]


class PeerKey:
    def __init__(self):
        self.private = Ed25519PrivateKey.generate()
        self.public_hex = self.private.public_key().public_bytes_raw().hex()

    def sign(self, data):
        return self.private.sign(data).hex()


def build_chain(key, tx_lists, start_previous=ledger.GENESIS_PREVIOUS_HASH, start_height=1):
    """Blocks (dicts, as /api/chain/blocks serves them) holding the given [(type, payload), ...]."""
    blocks, previous = [], start_previous
    for offset, txs in enumerate(tx_lists):
        stamp = ledger.now_timestamp()
        bodies = [{"type": t, "payload": json.loads(ledger.canonical_json(p)), "timestamp": stamp} for t, p in txs]
        block = ledger.make_block(start_height + offset, previous, bodies, sign=key.sign, proposer=key.public_hex)
        blocks.append(block)
        previous = block["hash"]
    return blocks


def resign(block, key):
    """Recomputes the hash and signature of a (modified) block header with `key`."""
    data = ledger.header_bytes(block)
    block["hash"] = ledger.sha256_hex(data)
    block["signature"] = key.sign(data)
    return block


class FakePeer:
    """Serves /api/chain/blocks from `blocks`, /api/blobs/<cid> from `blobs`, and raw `routes`
    {path: (status, body, content_type)}; files in `files` {path: bytes} with Range support.
    `break_after` {path: n} closes the connection after n bytes of a file (once); `delay` makes
    every answer wait that many seconds."""

    def __init__(self):
        self.blocks = []
        self.blobs = {}
        self.routes = {}
        self.files = {}
        self.break_after = {}
        self.delay = 0
        self.requests = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                peer.requests.append((self.path, dict(self.headers)))
                if peer.delay:
                    time.sleep(peer.delay)
                url = urlparse(self.path)
                if url.path in peer.routes:
                    status, body, content_type = peer.routes[url.path]
                    return self._send(status, body, content_type)
                if url.path == "/api/chain/blocks":
                    query = parse_qs(url.query)
                    start, limit = int(query.get("from", ["1"])[0]), int(query.get("limit", ["100"])[0])
                    chosen = [b for b in peer.blocks if b["height"] >= start][:limit]
                    return self._send(200, json.dumps({"blocks": chosen}).encode(), "application/json")
                if url.path.startswith("/api/blobs/"):
                    cid = url.path.rsplit("/", 1)[1]
                    if cid in peer.blobs:
                        return self._send(200, peer.blobs[cid], "application/octet-stream")
                    return self._send(404, b'{"error": {"message": "not found"}}', "application/json")
                if url.path in peer.files:
                    return self._file(url.path)
                return self._send(404, b"not found", "text/plain")

            def _file(self, path):
                data = peer.files[path]
                start = 0
                header = self.headers.get("Range")
                if header and header.startswith("bytes="):
                    start = int(header[6:].split("-")[0])
                    if start >= len(data):
                        return self._send(416, b"", "text/plain")
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = peer.break_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def _send(self, status, body, content_type):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- A second R3MES instance: own data dir (SQLite, blobs, node key), own Redis database ---


class Instance:
    def __init__(self, directory):
        self.data_dir = directory / "data"
        self.env = {
            **os.environ,
            "R3MES_DATA_DIR": str(self.data_dir),
            # Same test Redis server, another database number: no shared keys with this process.
            "REDIS_URL": os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/3",
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "r3mes_site.settings",
        }
        self.scripts = directory
        self.proc = None
        self.url = None

    def manage(self, *args, timeout=180):
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def run_script(self, code, *args):
        path = self.scripts / f"script-{time.monotonic_ns()}.py"
        path.write_text(code)
        out = self.manage("shell", "-c", f"import sys; sys.argv += {list(args)!r}; exec(open({str(path)!r}).read())")
        return json.loads(out.strip().splitlines()[-1])

    def start(self):
        port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "r3mes_site.asgi:application"],
            cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.scripts / "daphne.log", "wb"),
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("daphne exited: " + (self.scripts / "daphne.log").read_text()[-2000:])
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError("the second instance did not start within 60 s")

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def blob_path(self, cid):
        return self.data_dir / "blobs" / cid[-2:] / cid

    def sql(self, statement, *params):
        with sqlite3.connect(self.data_dir / "r3mes.sqlite3", timeout=20) as conn:
            conn.execute(statement, params)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
