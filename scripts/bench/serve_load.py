"""Bounded load test of `inception serve` on loopback: throughput and p50 / p99 latency at 1, 4
and 16 concurrent clients, with batching (--max-batch 8) and without (--max-batch 1), against
`inception bench` of the same model at batch 1 and 8 in the same run. Each point sends a fixed
number of requests and stops by itself; only 127.0.0.1 is contacted.

    python3 scripts/bench/serve_load.py --weights fixtures/full/inception_resnet_v2/model.safetensors \
        --model inception_resnet_v2 --requests 48 --out scripts/bench/serve_load.json
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/inception-target")), "release", "inception")
PHOTO = os.path.join(ROOT, "tests/fixtures/preprocess/landscape_chelsea.png")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(url, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if urllib.request.urlopen(url + "/healthz", timeout=2).read() == b"ok\n":
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def load(url, body, clients, requests, timeout=120):
    """`requests` POSTs spread over `clients` threads; per-request latencies and failures."""
    lat, errors, lock = [], [], threading.Lock()
    per = [requests // clients + (i < requests % clients) for i in range(clients)]

    def worker(n):
        for _ in range(n):
            t = time.perf_counter()
            try:
                req = urllib.request.Request(url + "/v1/classify?top=5", data=body, method="POST")
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    r.read()
                with lock:
                    lat.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(n,)) for n in per]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")  # noqa: E731
    return {"clients": clients, "requests": requests, "ok": len(lat), "errors": len(errors),
            "seconds": wall, "req_per_s": len(lat) / wall, "p50_ms": q(0.5), "p99_ms": q(0.99),
            "mean_ms": statistics.mean(lat) * 1e3 if lat else float("nan")}


def bench(model, batch):
    out = subprocess.run([BIN, "bench", "--model", model, "--batch", str(batch), "--runs", "5", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--model", default="inception_resnet_v2")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--out", default=os.path.join(ROOT, "scripts/bench/serve_load.json"))
    args = ap.parse_args()
    body = open(PHOTO, "rb").read()
    result = {"model": args.model, "load_before": open("/proc/loadavg").read().split()[:3], "points": []}
    result["bench"] = {b: bench(args.model, b)["images_per_s"] for b in (1, 8)}
    for max_batch in (1, 8):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        srv = subprocess.Popen([BIN, "serve", "--weights", args.weights, "--addr", f"127.0.0.1:{port}",
                                "--max-batch", str(max_batch), "--batch-window-ms", "5", "--queue", "256"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url)
            load(url, body, 1, 2)  # warm-up
            for clients in (1, 4, 16):
                n = max(args.requests, clients * 2) if clients > 1 else max(8, args.requests // 4)
                p = load(url, body, clients, n)
                p["max_batch"] = max_batch
                metrics = urllib.request.urlopen(url + "/metrics").read().decode()
                p["batches"] = [l for l in metrics.splitlines() if l.startswith("inception_batches_total")]
                print(json.dumps(p))
                result["points"].append(p)
        finally:
            srv.send_signal(signal.SIGTERM)
            srv.wait(timeout=60)
    result["load_after"] = open("/proc/loadavg").read().split()[:3]
    json.dump(result, open(args.out, "w"), indent=1)
    print("bench img/s:", result["bench"])
    print("| max batch | clients | requests | errors | req/s | p50 ms | p99 ms | vs bench (same batch) |")
    for p in result["points"]:
        ref = result["bench"][1 if p["max_batch"] == 1 else 8]
        print(f"| {p['max_batch']} | {p['clients']} | {p['ok']} | {p['errors']} | {p['req_per_s']:.2f} | "
              f"{p['p50_ms']:.0f} | {p['p99_ms']:.0f} | {p['req_per_s'] / ref:.2f} |")


if __name__ == "__main__":
    main()
