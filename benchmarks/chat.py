"""Chat through the real stack: Daphne (websockets), Redis (channel layer) and the inference
worker process with the real model.

Measures time to first token (p50 over short prompts, RAG on), tokens/s per stream, and the
aggregate tokens/s of 1, 4, 8 and 16 concurrent websocket chats (the worker batches them
continuously). Run: python benchmarks/chat.py [--tokens 32] [--ttft-runs 10] [--concurrency 1,4,8,16]
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import websockets

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PASSWORD = "bench-horse-battery-9"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_stack(tmp, args):
    redis_port = free_port()
    procs = [subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    env = {**os.environ, "R3MES_DATA_DIR": str(tmp), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "R3MES_MODEL_CACHE_DIR": os.environ.get("R3MES_MODEL_CACHE_DIR", str(REPO / "var" / "models")),
           "R3MES_RATE_CHAT_PER_MINUTE": "100000", "R3MES_MAX_BATCH": str(args.max_batch),
           "R3MES_TORCH_THREADS": str(args.threads), "R3MES_MAX_SEQ_LEN": "1024", "LOG_LEVEL": "WARNING",
           "R3MES_STREAM_IDLE_TIMEOUT": "60"}
    if args.device:
        env["R3MES_DEVICE"] = args.device
    run = lambda *a: subprocess.run([PYTHON, "manage.py", *a], cwd=REPO, env=env, check=True, capture_output=True)
    run("r3mes", "wait-redis")
    run("migrate", "-v", "0")
    run("r3mes", "user", "add", "bench", "--password", PASSWORD)
    port = free_port()
    log = open(tmp / "stack.log", "ab")
    procs.append(subprocess.Popen([str(Path(PYTHON).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port),
                                   "r3mes_site.asgi:application"], cwd=REPO, env=env, stdout=log, stderr=log))
    procs.append(subprocess.Popen([PYTHON, "manage.py", "r3mes", "worker"], cwd=REPO, env=env, stdout=log, stderr=log))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return procs, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit("stack did not become ready: " + (tmp / "stack.log").read_text()[-2000:])


def login(url):
    session = requests.Session()
    session.get(url + "/accounts/login/")
    session.post(url + "/accounts/login/", data={"username": "bench", "password": PASSWORD,
                                                 "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                 headers={"Referer": url + "/accounts/login/"})
    return "; ".join(f"{c.name}={c.value}" for c in session.cookies)


async def one_chat(url, cookie, prompt, max_tokens, options=None):
    """Returns (ttft_s, tokens, decode_s, total_s) for one answer over its own websocket."""
    ws_url = url.replace("http://", "ws://") + "/ws/chat/"
    async with websockets.connect(ws_url, additional_headers={"Cookie": cookie, "Origin": url}) as ws:
        sent = time.perf_counter()
        await ws.send(json.dumps({"type": "chat", "content": prompt,
                                  "options": {"max_tokens": max_tokens, **(options or {})}}))
        first = None
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "tokens" and first is None:
                first = time.perf_counter()
            elif frame["type"] == "done":
                end = time.perf_counter()
                tokens = frame["metrics"]["completion_tokens"]
                return first - sent, tokens, end - first, end - sent
            elif frame["type"] == "error":
                raise RuntimeError(frame["message"])


async def concurrent(url, cookie, n, max_tokens):
    started = time.perf_counter()
    results = await asyncio.gather(*[
        one_chat(url, cookie, f"Write a short story about a robot number {i}.", max_tokens,
                 {"temperature": 0.8, "seed": i}) for i in range(n)])
    wall = time.perf_counter() - started
    tokens = sum(r[1] for r in results)
    per_stream = statistics.mean((r[1] - 1) / r[2] for r in results if r[2] > 0 and r[1] > 1)
    return {"chats": n, "tokens": tokens, "wall_s": round(wall, 2), "aggregate_tok_s": round(tokens / wall, 2),
            "per_stream_tok_s": round(per_stream, 2), "ttft_p50_ms": round(statistics.median(r[0] for r in results) * 1000)}


async def bench(url, cookie, args):
    await one_chat(url, cookie, "Hi", 2)  # warm-up
    ttfts = []
    for _ in range(args.ttft_runs):
        ttft, *_ = await one_chat(url, cookie, "What is DNA?", 1, {"rag": True})
        ttfts.append(ttft)
    rows = [await concurrent(url, cookie, n, args.tokens) for n in args.concurrency]
    return ttfts, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--ttft-runs", type=int, default=10)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="r3mes-bench-"))
    procs = []
    try:
        procs, url = start_stack(tmp, args)
        health = requests.get(url + "/readyz", timeout=5).json()["worker"]
        ttfts, rows = asyncio.run(bench(url, login(url), args))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"backbone: {health['model']} on {health['backend']} ({health['device']})")
    print(f"TTFT p50 (short prompt, rag on, {args.ttft_runs} runs, websocket end to end): "
          f"{statistics.median(ttfts) * 1000:.0f} ms (min {min(ttfts) * 1000:.0f}, max {max(ttfts) * 1000:.0f})")
    print(f"{'chats':>5} {'tokens':>7} {'wall s':>7} {'agg tok/s':>10} {'per-stream tok/s':>17} {'TTFT p50 ms':>12} {'vs 1':>6}")
    base = rows[0]["aggregate_tok_s"]
    for row in rows:
        print(f"{row['chats']:>5} {row['tokens']:>7} {row['wall_s']:>7} {row['aggregate_tok_s']:>10} "
              f"{row['per_stream_tok_s']:>17} {row['ttft_p50_ms']:>12} {row['aggregate_tok_s'] / base:>5.2f}x")


if __name__ == "__main__":
    main()
