"""Load and soak test of `mlx-openelm serve`: concurrent streaming clients, then a long soak.

    python -m mlx_openelm.bench.serve_soak --preset tiny-config.json --tokenizer tokenizer.model

Starts the real server (`mlx_openelm.serve.server`, in a child process on 127.0.0.1 with a random-weight
model of `--preset`: a published size or a config.json) and drives it over HTTP only:

1. the spot-check prompts, each asked alone (their greedy answers are the reference);
2. for each count in `--clients`, that many streaming clients for `--seconds`, each sending
   requests one after another drawn from a mix (`soak_client.KINDS`): plain streams, greedy
   spot checks, stop strings, disconnects after a token or three, deliberate errors;
3. the soak: `--soak-requests` requests from `--soak-clients` clients, with the server's
   resident memory (RSS) read before and after (after a warm-up of as many requests).

Reports per phase: p50/p99 time to first token and inter-token latency, tokens per second,
errors (anything but what a request's kind must get; 0 when all is well) and spot checks
(answers under load equal to the answers alone); the soak's RSS growth is checked against
`--rss-growth-mb`. A table, or `--json`. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .soak_client import Outcome, one_request, spot_prompts

SPOT_TOKENS = 16


def model_args_of(preset: str):
    """`ModelArgs` of a published size (`270M`...) or of a config.json file."""
    from mlx_openelm.config import ModelArgs, preset_args

    return ModelArgs.from_file(preset) if Path(preset).suffix == ".json" else preset_args(preset)


def serve_child(args) -> None:
    """The server process: a random model behind the real server, its port on stdout, SIGTERM stops it."""
    import mlx.core as mx

    from mlx_openelm.bench.core import random_model
    from mlx_openelm.serve.server import ServerApp, make_server, serve
    from mlx_openelm.serve.limits import ServerLimits
    from mlx_openelm.tokenizer import Tokenizer

    model_args = model_args_of(args.preset)
    tokenizer = Tokenizer(args.tokenizer, bos_id=model_args.bos_token_id, eos_id=model_args.eos_token_id)
    app = ServerApp(random_model(model_args, mx.float32), tokenizer, "random")
    most = max(args.clients + [args.soak_clients])
    limits = ServerLimits(max_connections=2 * most + 8, max_requests=most + 8, max_tokens_in_flight=1 << 20)
    httpd = make_server(app, "127.0.0.1", 0, limits)
    signal.signal(signal.SIGTERM, lambda *_: app.stop())
    print(json.dumps({"port": httpd.server_address[1], "vocab": model_args.vocab_size}), flush=True)
    serve(httpd)


def start_server(args) -> tuple[subprocess.Popen, dict]:
    argv = [sys.executable, "-m", "mlx_openelm.bench.serve_soak", "--child", "--preset", args.preset,
            "--tokenizer", args.tokenizer, "--clients", ",".join(map(str, args.clients)),
            "--soak-clients", str(args.soak_clients)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"error: the server did not start (exit status {proc.wait()})")
    return proc, json.loads(line)


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB (/proc on Linux, `ps` elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout) / 1024


def drive(port: int, vocab: int, spots, clients: int, seconds=None, requests=None, seed=0) -> dict:
    """`clients` threads sending requests one after another until `seconds` pass or `requests` are sent."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    sent = [0]
    deadline = time.monotonic() + seconds if seconds else None

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while True:
            with lock:
                if (deadline and time.monotonic() >= deadline) or (requests and sent[0] >= requests):
                    return
                sent[0] += 1
            outcome = one_request(port, rng, vocab, spots, SPOT_TOKENS)
            with lock:
                outcomes.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(outcomes, clients, time.perf_counter() - start)


def settled_jobs(port: int, wait: float = 5.0) -> int:
    """Jobs still active or queued on the server once every client is done (disconnected ones take
    up to 0.1 s to be noticed); 0 unless a job leaked."""
    deadline = time.monotonic() + wait
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/health")
        health = json.loads(connection.getresponse().read())
        connection.close()
        left = health["active"] + health["queued"]
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def percentile(values: list[float], q: float):
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def summarize(outcomes: list[Outcome], clients: int, seconds: float) -> dict:
    ttfts = [o.ttft for o in outcomes if o.ttft is not None]
    gaps = [g for o in outcomes for g in o.gaps]
    tokens = sum(o.tokens for o in outcomes)
    spots = [o.spot for o in outcomes if o.spot is not None]
    errors = [o for o in outcomes if not o.ok]
    return {
        "clients": clients, "seconds": round(seconds, 1), "requests": len(outcomes),
        "completed": sum(o.ok and o.kind in ("stream", "spot", "stop") for o in outcomes),
        "disconnects": sum(o.ok and o.kind == "disconnect" for o in outcomes),
        "deliberate_sent": sum(o.kind == "deliberate" for o in outcomes),
        "deliberate_errors": sum(o.ok and o.kind == "deliberate" for o in outcomes),
        "errors": len(errors), "error_samples": [f"{o.kind}: {o.status} {o.error}" for o in errors[:5]],
        "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
        "ttft_ms_p50": percentile(ttfts, 0.5), "ttft_ms_p99": percentile(ttfts, 0.99),
        "itl_ms_p50": percentile(gaps, 0.5), "itl_ms_p99": percentile(gaps, 0.99),
        "spot_checks": len(spots), "spot_equal": sum(spots),
    }


def run(args) -> dict:
    proc, info = start_server(args)
    port, vocab = info["port"], info["vocab"]
    try:
        spots = spot_prompts(port, vocab, args.spot_prompts, SPOT_TOKENS, args.seed)
        phases = [drive(port, vocab, spots, n, seconds=args.seconds, seed=args.seed + n) for n in args.clients]
        drive(port, vocab, spots, args.soak_clients, requests=args.soak_clients * 2, seed=args.seed + 1)  # warm-up
        rss_start = rss_mb(proc.pid)
        soak = drive(port, vocab, spots, args.soak_clients, requests=args.soak_requests, seed=args.seed + 2)
        soak.update(rss_start_mb=round(rss_start, 1), rss_end_mb=round(rss_mb(proc.pid), 1))
        soak["rss_growth_mb"] = round(soak["rss_end_mb"] - soak["rss_start_mb"], 1)
        soak["rss_ok"] = soak["rss_growth_mb"] <= args.rss_growth_mb
        soak["left_running"] = settled_jobs(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    return {"preset": args.preset, "dtype": "float32", "rss_growth_bound_mb": args.rss_growth_mb,
            "phases": phases, "soak": soak, "server_exit": status,
            "ok": status == 0 and soak["rss_ok"] and soak["left_running"] == 0 and all(p["errors"] == 0 and p["spot_equal"] == p["spot_checks"]
                                                          for p in phases + [soak])}


COLUMNS = ["clients", "seconds", "requests", "completed", "disconnects", "deliberate_errors", "errors", "tokens",
           "tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "spot_checks", "spot_equal"]


def table(result: dict) -> str:
    rows = [[str(p[c]) for c in COLUMNS] for p in result["phases"]]
    rows.append([f"soak {result['soak']['clients']}"] + [str(result["soak"][c]) for c in COLUMNS[1:]])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    soak = result["soak"]
    lines.append(f"server RSS over the soak: {soak['rss_start_mb']} -> {soak['rss_end_mb']} MiB "
                 f"({soak['rss_growth_mb']:+} MiB; bound {result['rss_growth_bound_mb']} MiB: "
                 f"{'ok' if soak['rss_ok'] else 'EXCEEDED'}); checks {'passed' if result['ok'] else 'FAILED'}")
    return "\n".join(lines)


def parse(argv) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="270M", help="a published size (270M...) or a config.json path")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.model or tokenizer.json (only decodes)")
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each client count runs")
    parser.add_argument("--soak-requests", type=int, default=1000)
    parser.add_argument("--soak-clients", type=int, default=16)
    parser.add_argument("--spot-prompts", type=int, default=4)
    parser.add_argument("--rss-growth-mb", type=float, default=32.0, help="the bound on RSS growth over the soak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
        if min(args.clients + [args.soak_clients, args.soak_requests, args.spot_prompts]) < 1 or args.seconds <= 0:
            raise ValueError
    except ValueError:
        parser.error("--clients, --soak-clients, --soak-requests, --spot-prompts and --seconds must be positive")
    return parser, args


def main(argv=None) -> None:
    parser, args = parse(argv)
    if args.child:
        return serve_child(args)
    from mlx_openelm.errors import OpenELMError
    from mlx_openelm.tokenizer import Tokenizer

    try:
        model_args = model_args_of(args.preset)  # refuse bad inputs before starting the server
        Tokenizer(args.tokenizer, bos_id=model_args.bos_token_id, eos_id=model_args.eos_token_id)
    except OpenELMError as e:
        parser.error(str(e))
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else table(result))
    if not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
