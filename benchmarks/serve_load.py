"""Load test of `lmforge serve` on loopback: C concurrent clients x R requests each.

    python benchmarks/serve_load.py                       # 50 clients x 20 requests, tiny model
    python benchmarks/serve_load.py --max-queue 8         # a small queue: the designed 503s appear
    python benchmarks/serve_load.py --model runs/tiny/pretrain/model --stream

The server runs in its own process (`python -m lmforge.serve.cli serve`), the clients are asyncio
tasks with httpx in this one, so client work does not share the server's interpreter. Every
request is a chat completion with a fixed budget; a client whose request gets a 503 counts it
and goes on with its next request (no retries, so 503s are visible). Reports status counts,
latency p50/p90/p99, requests/s and generated tokens/s, and checks /health afterwards (no slot
may be left running). Traffic goes to 127.0.0.1 only and the loops are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


async def client(http, url, model, n, args, stats):
    for i in range(n):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Request {i}: tell me about files."}],
            "max_tokens": args.max_tokens,
            "temperature": 0.7,
            "seed": i,
            "ignore_eos": args.ignore_eos,
            "stream": args.stream,
        }
        t0 = time.perf_counter()
        try:
            if args.stream:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    status, first, toks = r.status_code, None, 0
                    async for line in r.aiter_lines():
                        # the first chunk carries only the role: time to first *token* is the first content
                        if first is None and '"delta": {"content": ' in line:
                            first = time.perf_counter() - t0
                        toks += '"delta": {"content": ' in line
                    if status == 200 and first is not None:
                        stats["ttft"].append(first)
            else:
                r = await http.post(url + "/v1/chat/completions", json=body)
                status = r.status_code
                if status == 200:
                    stats["tokens"] += r.json()["usage"]["completion_tokens"]
        except Exception as e:  # a transport error is a failure of the server
            status = type(e).__name__
        dt = time.perf_counter() - t0
        stats["status"][status] += 1
        if status == 200:
            stats["lat"].append(dt)


async def run_load(url, model, args):
    import httpx

    stats = {"status": Counter(), "lat": [], "ttft": [], "tokens": 0}
    limits = httpx.Limits(max_connections=args.clients + 5, max_keepalive_connections=args.clients + 5)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(client(http, url, model, args.requests, args, stats) for _ in range(args.clients))
        )
        wall = time.perf_counter() - t0
        health = (await http.get(url + "/health")).json()
    return stats, wall, health


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model folder (default: a random tiny model made for the run)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--stop-at-eos",
        dest="ignore_eos",
        action="store_false",
        help="let answers end early (default: exactly --max-tokens tokens each)",
    )
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--json")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.model:
        model_dir = Path(args.model)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.factories
        from tests.factories import make_tiny_model

        model_dir = make_tiny_model(Path(tmp.name) / "tiny", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2)
    cmd = [
        sys.executable,
        "-m",
        "lmforge.serve.cli",
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(args.max_queue),
        "--name",
        "bench",
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        import httpx

        deadline = time.time() + 180
        while True:  # bounded wait for the server to come up
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("server did not start in 180 s")
            time.sleep(0.2)
        stats, wall, health = asyncio.run(run_load(url, "bench", args))
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    total = args.clients * args.requests
    ok = stats["status"].get(200, 0)
    lat = stats["lat"]
    res = {
        "clients": args.clients,
        "requests_per_client": args.requests,
        "total": total,
        "max_tokens": args.max_tokens,
        "stream": args.stream,
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "status": {str(k): v for k, v in stats["status"].items()},
        "errors_other_than_503": total - ok - stats["status"].get(503, 0),
        "wall_s": round(wall, 2),
        "ok_requests_per_s": round(ok / wall, 2),
        "latency_s": {
            "p50": round(pct(lat, 50), 3),
            "p90": round(pct(lat, 90), 3),
            "p99": round(pct(lat, 99), 3),
            "mean": round(statistics.fmean(lat), 3) if lat else None,
        },
        "generated_tokens_per_s": round(stats["tokens"] / wall, 1) if not args.stream else None,
        "ttft_s_p50": round(pct(stats["ttft"], 50), 3) if stats["ttft"] else None,
        "health_after": {k: health.get(k) for k in ("running", "waiting", "rejected", "cancelled", "errors")},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if res["errors_other_than_503"] or health.get("running") or health.get("waiting"):
        sys.exit(1)


if __name__ == "__main__":
    main()
