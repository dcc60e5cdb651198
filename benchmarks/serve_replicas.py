"""Replicas behind one client: ``python -m benchmarks.serve_load --replicas 1,2,4`` (this module's ``run``).

For each count N, N ``zreward serve`` processes on the loopback interface and one ``RewardClient`` over all of
them, driven by ``--clients`` closed-loop threads (each call scores one request of ``--images-per-request``
images) for ``--seconds``: images/s and latency. Then the largest N again, with one replica SIGKILLed halfway
through: every call must still come back with one record per image (``failed`` counts calls that raised
``RewardError``, ``lost`` calls that returned neither all their records nor an error). Each replica runs with
``--server-threads`` torch threads, so on a CPU the replicas compete for the same cores.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.serve_load import CLIENT_TIMEOUT_S, start_server, stop_server


def start_replicas(model_dir, count: int, threads: int) -> list:
    """``count`` ``zreward serve`` processes started side by side: ``[(process, url)]``."""
    with ThreadPoolExecutor(count) as starting:
        return list(starting.map(lambda _: start_server(model_dir, "--threads", str(threads), "--max-queue", "256"),
                                 range(count)))


def drive(client, images: np.ndarray, clients: int, seconds: float, images_per_request: int,
          during=None) -> dict:
    """``clients`` threads calling ``client.score`` for ``seconds``; ``during()`` runs halfway through."""
    from zreward.deploy.client import RewardError

    latencies, outcome, lock = [], Counter(), threading.Lock()
    stop_at = time.monotonic() + seconds

    def loop(index: int) -> None:
        n = index
        while time.monotonic() < stop_at:
            rows = [(n * images_per_request + k) % len(images) for k in range(images_per_request)]
            started = time.perf_counter()
            try:
                records = client.score(images[rows], [f"prompt {r}" for r in rows])
            except RewardError:
                with lock:
                    outcome["failed"] += 1
                continue
            with lock:
                ok = len(records) == images_per_request and all(np.isfinite(r["reward"]) for r in records)
                outcome["ok" if ok else "lost"] += 1
                latencies.append(time.perf_counter() - started)
            n += clients

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    if during is not None:
        time.sleep(seconds / 2)
        during()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"ok": outcome["ok"], "failed": outcome["failed"], "lost": outcome["lost"],
            "images_per_s": outcome["ok"] * images_per_request / wall,
            "p50_ms": float(np.percentile(ms, 50)) if ms.size else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if ms.size else float("nan")}


def run(args, model_dir, environment: dict) -> str:
    from zreward.deploy.client import RewardClient

    counts = sorted({int(n) for n in args.replicas.split(",")})
    images = (np.random.default_rng(0).random((64, args.image_size, args.image_size, 3)) * 255).astype(np.uint8)
    rows = []
    for count in counts + [max(counts)]:
        killing = len(rows) == len(counts)
        if killing and count < 2:
            break
        servers = start_replicas(model_dir, count, args.server_threads)
        try:
            with RewardClient([url for _, url in servers], timeout=CLIENT_TIMEOUT_S, retries=4, backoff_s=0.5,
                              max_images_per_request=args.images_per_request) as client:
                drive(client, images, 2, 1.0, args.images_per_request)  # warm-up, not counted
                warm = [r["sent"] for r in client.replicas()]
                victim = servers[0][0]
                result = drive(client, images, args.clients, args.seconds, args.images_per_request,
                               during=(lambda: os.kill(victim.pid, signal.SIGKILL)) if killing else None)
                result["sent"] = [r["sent"] - w for r, w in zip(client.replicas(), warm)]
        finally:
            for process, _ in servers:
                if process.poll() is None:
                    stop_server(process)
                else:
                    process.wait()
        result["mode"] = f"{count} replica(s)" + (", one SIGKILLed halfway" if killing else "")
        rows.append(result)
        print(result, file=sys.stderr)
    return report(args, rows, environment)


def report(args, rows: list[dict], environment: dict) -> str:
    lines = ["# `zreward serve` replicas behind one `RewardClient` (CPU)", "",
             f"`{environment['command']}`", "",
             f"{environment['machine']}; torch {environment['torch']}, transformers {environment['transformers']}, "
             f"uvicorn {environment['uvicorn']}; commit `{environment['commit']}`, {environment['date']}; load "
             f"average {environment['load']} at the start.", "",
             f"Model: {environment['model']}. {args.clients} closed-loop client threads share one `RewardClient` "
             f"(least outstanding requests); each call scores {args.images_per_request} random "
             f"{args.image_size}x{args.image_size} image(s). Every replica is its own `zreward serve` process with "
             f"`--threads {args.server_threads}`; {args.seconds:g} s per row, all on the loopback interface.", "",
             "| replicas | calls ok | images/s | p50 ms | p99 ms | failed | lost | requests sent per replica |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['mode']} | {r['ok']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['failed']} | {r['lost']} | {', '.join(map(str, r['sent']))} |" for r in rows]
    lines += ["", "`failed`: calls that raised `RewardError` (an explicit error); `lost`: calls that returned neither "
              "all their records nor an error. Requests sent per replica include the retries of requests the killed "
              f"replica did not answer. Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
              "", f"The machine has {os.cpu_count()} CPU cores, shared by the clients, the HTTP handling and every "
              "replica's forward: past that many replicas they compete for the cores, so these figures show the "
              "client spreading the load and surviving a kill, not the scaling a machine with one accelerator per "
              "replica gets. No accelerator was measured."]
    return "\n".join(lines) + "\n"
