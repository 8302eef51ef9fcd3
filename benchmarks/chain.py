"""Chain-sync benchmark: blocks/s replicated between two R3MES instances on this machine.

Runs side by side, in one process run:
  seal      — this node sealing blocks with `ledger.record` (sign + insert), blocks/s;
  verify    — `ledger.check_block` over the generated chain in memory (hashes, Merkle, ed25519);
  sync/http — sync from a plain HTTP server serving the pre-generated chain (no Django serving it);
  sync/r3mes — sync from a real second R3MES instance (daphne subprocess, own data dir and SQLite),
               at several page sizes.
Ratios are reported against `verify` (the cryptographic floor).

    python benchmarks/chain.py [--blocks 2000] [--txs-per-block 1]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory):
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


SEAL = """
import json, sys, time
from mining import keys, ledger
blocks, per = int(sys.argv[-2]), int(sys.argv[-1])
keys.node_private_key()
start = time.perf_counter()
for i in range(blocks):
    ledger.record_many([("submission", {"miner": f"m{i % 17}", "shard": j, "loss": 1.0 / (i + 1),
                        "blob_cid": "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"}) for j in range(per)])
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "public_key": keys.node_public_key_hex()}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=2000)
    parser.add_argument("--txs-per-block", type=int, default=1)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="r3mes-chain-bench-"))
    redis_proc, redis_port = start_redis(tmp)
    source_env = {**os.environ, "R3MES_DATA_DIR": str(tmp / "source"), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/1",
                  "LOG_LEVEL": "WARNING", "R3MES_RATE_PEER_PER_MINUTE": "100000", "DJANGO_SETTINGS_MODULE": "r3mes_site.settings"}
    daphne = None
    try:
        def manage(*cmd):
            done = subprocess.run([sys.executable, "manage.py", *cmd], cwd=REPO, env=source_env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr)
            return done.stdout

        manage("migrate", "--noinput", "-v", "0")
        script = tmp / "seal.py"
        script.write_text(SEAL)
        sealed = json.loads(manage("shell", "-c", f"import sys; sys.argv += ['{args.blocks}', '{args.txs_per_block}']; "
                                                  f"exec(open({str(script)!r}).read())").strip().splitlines()[-1])
        port = free_port()
        daphne = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "r3mes_site.asgi:application"],
                                  cwd=REPO, env=source_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        source_url = f"http://127.0.0.1:{port}"

        # This process is the replicating node, with its own data dir and Redis database.
        os.environ.update({"R3MES_DATA_DIR": str(tmp / "replica"), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/2",
                           "LOG_LEVEL": "WARNING", "DJANGO_SETTINGS_MODULE": "r3mes_site.settings"})
        import django

        django.setup()
        import requests
        from django.core.management import call_command

        from mining import chain_sync, ledger
        from mining.models import Peer

        call_command("migrate", "--noinput", verbosity=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{source_url}/healthz", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise SystemExit("the source instance did not start")
                time.sleep(0.2)

        # The whole chain as JSON, for the in-memory and plain-HTTP runs.
        chain, start = [], 1
        while True:
            page = requests.get(f"{source_url}/api/chain/blocks", params={"from": start, "limit": 500}, timeout=60).json()["blocks"]
            chain += page
            if len(page) < 500:
                break
            start += 500
        assert len(chain) == args.blocks, len(chain)
        public_key = sealed["public_key"]

        results = []
        results.append(("seal (ledger.record, sign + insert)", args.blocks / sealed["seconds"], sealed["seconds"]))

        began = time.perf_counter()
        previous = ledger.GENESIS_PREVIOUS_HASH
        for block in chain:
            ledger.check_block(block, height=block["height"], previous_hash=previous, public_key=public_key)
            previous = block["hash"]
        elapsed = time.perf_counter() - began
        results.append(("verify in memory (check_block)", args.blocks / elapsed, elapsed))

        server = _serve(chain)
        # Warm-up (imports, connections, first queries), not measured.
        warm = Peer.objects.create(name="warm-up", url=f"http://127.0.0.1:{server.server_address[1]}", public_key=public_key)
        chain_sync.sync_peer(warm, limit=50)
        for label, url, page_size in [
            ("sync/http page 200 (plain server)", f"http://127.0.0.1:{server.server_address[1]}", 200),
            ("sync/r3mes page 50", source_url, 50),
            ("sync/r3mes page 200", source_url, 200),
            ("sync/r3mes page 500", source_url, 500),
        ]:
            Peer.objects.all().delete()
            peer = Peer.objects.create(name="source", url=url, public_key=public_key)
            began = time.perf_counter()
            result = chain_sync.sync_peer(peer, limit=page_size)
            elapsed = time.perf_counter() - began
            if result.error or result.accepted != args.blocks:
                raise SystemExit(f"{label}: {result.summary()}")
            assert ledger.verify_chain(peer).ok
            results.append((label, args.blocks / elapsed, elapsed))
        server.shutdown()

        floor = results[1][1]
        print(f"\nchain benchmark: {args.blocks} blocks × {args.txs_per_block} tx, one machine ({os.cpu_count()} CPUs)\n")
        print(f"{'run':40} {'blocks/s':>10} {'seconds':>9} {'vs verify':>10}")
        for label, rate, seconds in results:
            print(f"{label:40} {rate:10.0f} {seconds:9.2f} {rate / floor:10.2f}")
    finally:
        if daphne is not None:
            daphne.terminate()
            daphne.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _serve(chain):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            query = parse_qs(urlparse(self.path).query)
            start, limit = int(query["from"][0]), int(query["limit"][0])
            body = json.dumps({"blocks": chain[start - 1:start - 1 + limit]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    main()
