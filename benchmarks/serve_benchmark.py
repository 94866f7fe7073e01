"""Throughput and latency of `bayes-llm serve`, measured against real server processes on 127.0.0.1.

Three phases, each with N concurrent clients (the official `openai` client, one thread each) sending
a fixed number of requests, `max_tokens` new tokens each (`ignore_eos`, so every request generates
exactly that many):

1. base: in waves of N requests sent together, every request with the base weights
   (`strategy: base`): the ceiling.
2. mixed: the same waves, every client with its own fixed blend of the experts (N different
   blends), on the mixed server (one forward, a blend per row) and on the regroup server
   (`--batching regroup`: weights merged per blend group, groups one after another: the path
   without per-row blends).
3. load: clients sending freely (each its next request once its last is answered), the default
   route (pass 1 → posterior → blend) on the test prompts of every domain: latency p50/p95,
   errors, and the first pass's share of each request's time in the server.

    python -m benchmarks.serve_benchmark            # the pipeline's default bundle and base
    python -m benchmarks.serve_benchmark --help

Writes `reports/serve/benchmark.json`.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pandas as pd
import torch

from bayes_llm import paths
from bayes_llm.io import write_json

REPORT = Path("reports/serve/benchmark.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(bundle: Path, base: Path, batching: str, max_batch: int, max_wait_ms: float, decode_threads: int):
    port = _free_port()
    command = [sys.executable, "-m", "bayes_llm", "serve", "--bundle", str(bundle), "--base", str(base),
               "--port", str(port), "--batching", batching, "--max-batch", str(max_batch),
               "--max-wait-ms", str(max_wait_ms), "--decode-threads", str(decode_threads)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit(f"the server did not start:\n{process.stderr.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def load(url: str, model: str, requests: list[dict], clients: int, waves: bool = False) -> dict:
    """Send `requests` (completion bodies) from `clients` threads; request i goes to client i % clients.
    `waves`: the clients send together, wait for every answer, and send again (`clients` concurrent
    requests each time), else each client sends its next request when its last one is answered."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    latencies: list[float] = []
    tokens, errors, first_pass, generate = [0], [], [], []
    lock, barrier = threading.Lock(), threading.Barrier(clients)

    def run(mine: list[dict]) -> None:
        for body in mine:
            if waves:
                barrier.wait()
            started = time.perf_counter()
            try:
                reply = client.completions.create(model=model, **body)
            except openai.OpenAIError as error:
                with lock:
                    errors.append(repr(error))
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += reply.usage.completion_tokens
                timing = reply.choices[0].model_extra["bayes_llm"]["timing_ms"]
                first_pass.append(timing["first_pass"])
                generate.append(timing["generate"])

    threads = [threading.Thread(target=run, args=(requests[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(requests),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": round(seconds, 2),
        "tokens": tokens[0],
        "tokens_per_second": round(tokens[0] / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        # per request: its batch's pass 1 against pass 1 + its own pass 2
        "first_pass_share": round(float(np.mean(np.array(first_pass) / (np.array(first_pass) + generate))), 4)
        if first_pass
        else None,
    }


def blends(n: int, experts: list[str]) -> list[dict[str, float]]:
    """n different blends: each expert alone, then evenly spread mixtures (deterministic)."""
    out = [{e: 1.0} for e in experts]
    rng = np.random.default_rng(0)
    while len(out) < n:
        w = rng.dirichlet(np.ones(len(experts)))
        out.append({e: round(float(x), 3) for e, x in zip(experts, w, strict=True)})
    return out[:n]


def test_prompts(data: Path, n: int) -> list[str]:
    domains = sorted(p.name for p in data.iterdir() if (p / "test.parquet").is_file())
    columns = [pd.read_parquet(data / d / "test.parquet")["prompt"].tolist() for d in domains]
    return [columns[i % len(columns)][i // len(columns)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="default: the one bundle under bundles/")
    parser.add_argument("--base", type=Path, default=paths.BASE)
    parser.add_argument("--data", type=Path, default=paths.DATA, help="prepared data (the load phase's prompts)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client per phase (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=50.0,
                        help="the servers' batching window (default: %(default)s)")
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="the servers' --decode-threads (default %(default)s: the clients share this machine)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per phase; the median is reported")
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    bundle = args.bundle or next(iter(sorted(Path("bundles").glob("*/manifest.json")))).parent
    model = bundle.name
    experts = sorted(p.stem for p in (bundle / "experts").glob("*.safetensors"))
    n = args.clients * args.rounds

    def bodies(extensions: list[dict], prompts: list[str]) -> list[dict]:
        return [{"prompt": p, "max_tokens": args.max_tokens, "extra_body": {"bayes_llm": {**x, "ignore_eos": True}}}
                for p, x in zip(prompts, extensions, strict=True)]  # fmt: skip

    question = "Question: What is 7 + 5?\nAnswer:"
    mixes = blends(args.clients, experts)
    base_requests = bodies([{"strategy": "base"}] * n, [question] * n)
    mixed_requests = bodies([{"blend": mixes[i % args.clients]} for i in range(n)], [question] * n)
    prompts = test_prompts(args.data, n)
    load_requests = bodies([{}] * n, [f"Question: {p}\nAnswer:" for p in prompts])
    phases: dict[str, dict] = {}
    totals = {"requests": 0, "errors": 0}  # every measured run, not only the medians

    def measure(name: str, url: str, requests: list[dict], waves: bool) -> None:
        """The run with the median tokens/s of `--repeats` (a shared 2-core machine is noisy)."""
        runs = []
        for _ in range(args.repeats):
            before = httpx.get(f"{url}/health").json()
            run = load(url, model, requests, args.clients, waves)
            after = httpx.get(f"{url}/health").json()
            batches = max(1, after["batches"] - before["batches"])
            run["mean_batch_rows"] = round((after["rows"] - before["rows"]) / batches, 2)
            runs.append(run)
        for run in runs:
            totals["requests"] += run["requests"]
            totals["errors"] += run["errors"]
        runs.sort(key=lambda run: run["tokens_per_second"])
        phases[name] = {**runs[len(runs) // 2], "tokens_per_second_runs": [r["tokens_per_second"] for r in runs]}

    with server(bundle, args.base, "mixed", args.clients, args.max_wait_ms, args.decode_threads) as url:
        load(url, model, base_requests[: args.clients], args.clients)  # warm-up
        measure("base", url, base_requests, waves=True)
        measure("mixed", url, mixed_requests, waves=True)
        measure("load", url, load_requests, waves=False)
    with server(bundle, args.base, "regroup", args.clients, args.max_wait_ms, args.decode_threads) as url:
        load(url, model, mixed_requests[: args.clients], args.clients)
        measure("regroup", url, mixed_requests, waves=True)
    base, mixed, regroup = (phases[k]["tokens_per_second"] for k in ("base", "mixed", "regroup"))
    report = {
        "base_tokens_per_second": base,
        "mixed_tokens_per_second": mixed,
        "regroup_tokens_per_second": regroup,
        "mixed_over_base_throughput": round(mixed / base, 3),
        "regroup_over_base_throughput": round(regroup / base, 3),
        "mixed_over_regroup_throughput": round(mixed / regroup, 2),
        "p50_ms": phases["load"]["p50_ms"],
        "p95_ms": phases["load"]["p95_ms"],
        "first_pass_share": phases["load"]["first_pass_share"],
        "requests": totals["requests"],
        "errors": totals["errors"],
        "targets": {
            "mixed_over_base_throughput >= 0.6": mixed / base >= 0.6,
            "mixed_over_regroup_throughput >= 1.5": mixed / regroup >= 1.5,
            "errors == 0": totals["errors"] == 0,
            "first_pass_share <= 0.10": (phases["load"]["first_pass_share"] or 0) <= 0.10,
        },
        "setup": {
            "bundle": str(bundle),
            "clients": args.clients,
            "requests_per_phase": n,
            "max_tokens": args.max_tokens,
            "max_wait_ms": args.max_wait_ms,
            "decode_threads": args.decode_threads,
            "repeats": args.repeats,
            "blends": mixes,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        "phases": phases,
    }
    write_json(args.out, report)
    print({k: v for k, v in report.items() if k not in ("setup", "phases")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
