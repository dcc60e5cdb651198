"""Load and fault test of ``zreward serve`` on the loopback interface, bounded in time.

``python -m benchmarks.serve_load --out benchmarks/results/cpu-serve-load.md`` starts the service as its own
process (``zreward serve --port 0`` on 127.0.0.1) on a model folder (``--model``; default: the tiny demo student
with random weights) and measures, each phase for ``--seconds``:

1. throughput with micro-batching: ``--clients`` closed-loop clients (send, wait for the answer, send again),
   images/s and p50 / p99 latency;
2. the same load with one request per forward (``--max-batch 1 --max-wait-ms 0``);
3. overload: four times the clients against a queue of ``--clients`` images, counting what comes back;
4. faults during load: a malformed body, an oversized body, an unknown field, a client process killed while its
   request is queued, a client that hangs up halfway through its body; afterwards the service must still
   answer, and the abandoned request must not have been scored.

``--replicas 1,2,4`` measures replicas behind one ``RewardClient`` instead (``benchmarks.serve_replicas``).

A request is *lost* when its client got neither a score nor an explicit error (a timeout or a dropped
connection); the run checks there are none. Results go to a markdown file with the machine, versions and
command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

CLIENT_TIMEOUT_S = 60.0


def start_server(model_dir: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """``zreward serve`` on a free loopback port; returns the process and its URL once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "zreward.cli", "serve", "--model", str(model_dir), "--port", "0",
                                "--log-level", "error", *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    line = ""
    while "zreward serve:" not in line:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"zreward serve exited with {process.returncode} before listening")
    # Keep reading its stderr so that a chatty server never blocks on a full pipe.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    return process, re.search(r"on (http://127\.0\.0\.1:\d+)", line).group(1)


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def read_metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=CLIENT_TIMEOUT_S).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float, pause_after_refusal_s: float = 0.0
                ) -> dict:
    """``clients`` threads posting ``bodies`` round-robin for ``seconds``: latencies of the 200s, status counts,
    and the lost requests (no answer at all). A client pauses ``pause_after_refusal_s`` after a 503."""
    import httpx

    latencies, codes, lost = [], Counter(), []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S, headers={"Content-Type": "application/json"}) as http:
            n = index
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = http.post(f"{url}/score", content=bodies[n % len(bodies)])
                except httpx.TransportError as error:
                    with lock:
                        lost.append(f"{type(error).__name__}: {error}")
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    codes[response.status_code] += 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    elif "error" not in response.json():  # every refusal must say why
                        lost.append(f"{response.status_code} without a JSON error")
                if response.status_code == 503:
                    time.sleep(pause_after_refusal_s)
                n += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "codes": codes, "lost": lost, "wall_s": time.perf_counter() - started}


def summarize(name: str, run: dict, images_per_request: int, before: dict, after: dict) -> dict:
    latencies = np.array(run["latencies"]) * 1000
    batches = after["zreward_batches_total"] - before.get("zreward_batches_total", 0)
    images = after["zreward_images_scored_total"] - before.get("zreward_images_scored_total", 0)
    return {"mode": name, "ok": run["codes"][200], "codes": dict(run["codes"]), "lost": len(run["lost"]),
            "images_per_s": run["codes"][200] * images_per_request / run["wall_s"],
            "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
            "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
            "mean_batch": images / batches if batches else float("nan")}


def _post_raw(url: str, body: bytes, headers: dict | None = None):
    import httpx

    return httpx.post(f"{url}/score", content=body, timeout=CLIENT_TIMEOUT_S,
                      headers={"Content-Type": "application/json", **(headers or {})})


def killed_client(host: str, port: int, request: bytes) -> subprocess.Popen:
    """A separate process that sends ``request`` and then waits; the caller kills it mid-request."""
    code = ("import socket, sys, time\n"
            f"s = socket.create_connection(({host!r}, {port}))\n"
            "s.sendall(sys.stdin.buffer.read())\n"
            "print('sent', flush=True)\n"
            "time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    process.stdin.write(request)
    process.stdin.close()
    process.stdout.readline()
    return process


def fault_checks(url: str, body: bytes, max_request_mb: float) -> list[tuple[str, str, bool]]:
    """Each fault while the service is under load: (what, what came back, as expected)."""
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    port = int(port)
    checks = []
    bad = _post_raw(url, b'{"images": [')
    checks.append(("malformed JSON", f"{bad.status_code} {bad.json()['error'][:60]}", bad.status_code == 400))
    huge = _post_raw(url, b" " * int(max_request_mb * 2**20 + 1))
    checks.append(("body above --max-request-mb", f"{huge.status_code} {huge.json()['error'][:60]}",
                   huge.status_code == 413))
    extra = _post_raw(url, body[:-1] + b', "pickle": "gASV"}')
    checks.append(("unknown field", f"{extra.status_code} {extra.json()['error'][:60]}", extra.status_code == 400))

    before = read_metrics(url)
    head = (f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    victim = killed_client(host, port, head + body)
    victim.send_signal(signal.SIGKILL)  # its request is queued or being scored right now
    victim.wait()
    with socket.create_connection((host, port)) as half:
        half.sendall(head + body[: len(body) // 2])  # then hang up halfway through the body
    time.sleep(0.5)
    after_faults = _post_raw(url, body)
    after = read_metrics(url)
    lost_work = after["zreward_cancelled_requests_total"] - before["zreward_cancelled_requests_total"]
    checks.append(("client killed mid-request, another hangs up mid-body",
                   f"next request {after_faults.status_code}; {lost_work:.0f} abandoned request(s) skipped unscored",
                   after_faults.status_code == 200))
    return checks


def encode_bodies(count: int, images_per_request: int, size: int) -> list[bytes]:
    from zreward.deploy.images import encode_image

    rng = np.random.default_rng(0)
    bodies = []
    for i in range(count):
        images = (rng.random((images_per_request, size, size, 3)) * 255).astype(np.uint8)
        bodies.append(json.dumps({"images": [encode_image(image) for image in images],
                                  "prompts": [f"prompt {i}"] * images_per_request}).encode())
    return bodies


def tiny_model_folder(directory: Path) -> Path:
    import torch

    from zreward.deploy.model_folder import save_model_folder
    from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer

    return save_model_folder(tiny_scorer(0, STUDENT_CONFIG, torch.device("cpu")), directory / "student")


def _table(rows: list[dict]) -> list[str]:
    lines = ["| mode | requests ok | images/s | p50 ms | p99 ms | mean batch | answers | lost |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["codes"].items()))
        lines.append(f"| {r['mode']} | {r['ok']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['mean_batch']:.2f} | {codes} | {r['lost']} |")
    return lines


def report(args, rows: list[dict], checks: list, environment: dict) -> str:
    lines = ["# `zreward serve` load and fault test (CPU)", "",
             f"`{environment['command']}`", "",
             f"{environment['machine']}; torch {environment['torch']}, transformers {environment['transformers']}, "
             f"uvicorn {environment['uvicorn']}; commit `{environment['commit']}`, {environment['date']}; load average "
             f"{environment['load']} at the start.", "",
             f"Model: {environment['model']}. Each request carries {args.images_per_request} random "
             f"{args.image_size}x{args.image_size} PNG image(s); {args.clients} closed-loop clients in one process, the "
             f"service in another (`--threads {args.server_threads}`), {args.seconds:g} s per phase, both on the "
             "loopback interface.", ""]
    lines += _table(rows)
    by_mode = {r["mode"]: r for r in rows}
    batched, single = by_mode["micro-batching"]["images_per_s"], by_mode["one request per forward"]["images_per_s"]
    speedup = batched / single if single else float("nan")
    lines += ["", f"Micro-batching serves {speedup:.2f}x the images/s of one request per forward.", "",
              "| fault (under load) | answer | as expected |", "|---|---|---|"]
    lines += [f"| {what} | {answer} | {'yes' if ok else 'NO'} |" for what, answer, ok in checks]
    lines += ["", f"Requests lost over all phases: {sum(r['lost'] for r in rows)} (a lost request got neither a score "
              "nor an explicit error). Load average at the end: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.", "",
              "On a CPU the clients, the HTTP handling and the forward share the cores, so these figures move with "
              "whatever else runs on the machine. Batching saves the per-forward overhead, which dominates for the tiny "
              "model; a model whose forward is compute-bound on one CPU thread gains little from it. No accelerator was "
              "measured."]
    return "\n".join(lines) + "\n"


def environment_info(args, model: str) -> dict:
    import torch
    import transformers
    import uvicorn

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": "python -m benchmarks.serve_load " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
            "torch": torch.__version__, "transformers": transformers.__version__, "uvicorn": uvicorn.__version__,
            "commit": commit or "unknown", "date": time.strftime("%Y-%m-%d"),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()), "model": model}


def model_and_environment(args, scratch: Path) -> tuple[Path, dict]:
    """The model folder to serve (``--model``, else the tiny demo student written to ``scratch``) and the run's
    machine, versions and command."""
    model_dir = args.model or tiny_model_folder(scratch)
    model = str(args.model) if args.model else "the tiny demo student (random weights, hidden size 32)"
    return model_dir, environment_info(args, model)


def run(args) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        model_dir, environment = model_and_environment(args, Path(scratch))
        if args.replicas:
            from benchmarks.serve_replicas import run as run_replicas

            return run_replicas(args, model_dir, environment)
        bodies = encode_bodies(16, args.images_per_request, args.image_size)
        rows, checks = [], []
        queue = str(max(4 * args.clients * args.images_per_request, 64))
        phases = [("micro-batching", ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                                      "--max-queue", queue], args.clients),
                  ("one request per forward", ["--max-batch", "1", "--max-wait-ms", "0", "--max-queue", queue],
                   args.clients),
                  (f"overload: {4 * args.clients} clients, queue of {args.clients} images",
                   ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                    "--max-queue", str(args.clients * args.images_per_request),
                    "--max-request-images", str(args.images_per_request)], 4 * args.clients)]
        for name, options, clients in phases:
            process, url = start_server(model_dir, *options, "--max-request-mb", str(args.max_request_mb),
                                        "--threads", str(args.server_threads))
            try:
                closed_loop(url, bodies[:2], 2, 1.0)  # warm-up, not counted
                before = read_metrics(url)
                # Refused clients wait a little, as RewardClient does (longer: Retry-After), instead of spinning.
                result = closed_loop(url, bodies, clients, args.seconds, pause_after_refusal_s=0.05)
                rows.append(summarize(name, result, args.images_per_request, before, read_metrics(url)))
                print(rows[-1], file=sys.stderr)
                if name == "micro-batching":
                    before, during = read_metrics(url), {}
                    load = threading.Thread(target=lambda: during.update(closed_loop(url, bodies, args.clients, 4.0)))
                    load.start()
                    checks = fault_checks(url, bodies[0], args.max_request_mb)
                    load.join()
                    rows.append(summarize("micro-batching, during the faults below", during,
                                          args.images_per_request, before, read_metrics(url)))
            finally:
                stop_server(process)
    return report(args, rows, checks, environment)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: a tiny random-weight student)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-request-mb", type=float, default=1.0)
    parser.add_argument("--server-threads", type=int, default=1,
                        help="the service's torch threads (the clients run on the same CPU)")
    parser.add_argument("--replicas", help="comma-separated replica counts (e.g. 1,2,4): measure that many services "
                                           "behind one RewardClient, then a replica killed mid-run, instead of the "
                                           "phases above (benchmarks.serve_replicas)")
    parser.add_argument("--out", type=Path, help="write the markdown report here (else print it)")
    args = parser.parse_args(argv)
    text = run(args)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
