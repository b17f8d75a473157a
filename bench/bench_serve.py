"""`llava-edge serve` under 1, 2, 4 and 8 concurrent clients on the `small` preset, as JSON.

    .venv/bin/python bench/bench_serve.py [--work DIR | --model DIR] [--threads 2] [--repeats 3]

Builds (once, cached in --work) a `small` checkpoint and its export, starts the server in a
subprocess (--max-batch 8) and runs N clients at once, each streaming `--rounds` requests one
after the other, each about a new picture of its own (so every request runs the vision encoder)
for exactly 64 new tokens. Per N: aggregate tokens/s (all tokens over the wall time), the
engine's decode throughput (tokens of batched decode steps per second spent in them, from
/metrics), time to first token p50/p95 as clients see it (the first event of the stream, which
the server sends with the first token), and each client's tokens/s. Ratios to
one client are taken within one repeat (the machine's drift cancels), then the median is shown.
TTFT is reported over all requests and over all but each client's first: N clients starting at
once queue their N prefills behind each other (the first round), while later rounds arrive spread
out (the engine admits one request between two decode steps, so answers end at different steps).
Also measured in-process: a conversation's second turn with and without the prefix store.

Targets on 2 cores: decode throughput at 8 clients >= 3x one client's, TTFT p95 at 8 clients
under 4x one client's. The machine may be shared: the load average is reported with the figures.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from bench_runtime import prepare  # bench/ is on the path of a script run from it
from PIL import Image

from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import bench
from llava_edge.serve.server import bind

TARGETS = {"decode_throughput_8_vs_1": 3.0, "ttft_p95_8_vs_1_under": 4.0}
QUESTION = "What is in the picture? Describe it."


def picture(seed: int) -> str:
    """A new picture as a data: URI (random blocks: every one differs, none compresses away)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((224, 224), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Server:
    """`llava-edge serve MODEL OPTIONS...` on a free local port, once its /health says ready
    (soak_serve.py runs its server through this too)."""

    def __init__(self, model: Path, *options: str):
        sock = bind("127.0.0.1", 0)
        port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "llava_edge.cli", "serve", str(model), "--port", str(port)),
                *("--log-level", "warning", *options),
            ]
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:  # it said why on stderr; waiting longer is a hang
                raise LlavaEdgeError(
                    f"`llava-edge serve {model}` exited ({self.process.returncode}) before it was ready"
                )
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise LlavaEdgeError(f"`llava-edge serve {model}` was not ready after 300 s")

    def engine(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith("llava_edge_engine_"):
                name, value = line.split()
                out[name.removeprefix("llava_edge_engine_").removesuffix("_total")] = float(value)
        return out

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def one_request(url: str, image: str, new_tokens: int) -> dict[str, float]:
    body = {
        "model": "small",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": new_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            first = first or time.perf_counter()  # the server sends its first chunk at the
            chunk = json.loads(line[6:])  # first token (a random model's may show no text)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"start": start, "end": end, "ttft": first - start, "tokens": tokens}


def run_clients(server: Server, clients: int, rounds: int, new_tokens: int, seed: int) -> dict:
    records: list[list[dict]] = [[] for _ in range(clients)]
    images = [[picture(seed + 1000 * c + r) for r in range(rounds)] for c in range(clients)]

    def client(c: int) -> None:
        for r in range(rounds):
            records[c].append(one_request(server.url, images[c][r], new_tokens))

    before = server.engine()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.engine()
    flat = [r for rs in records for r in rs]
    wall = max(r["end"] for r in flat) - min(r["start"] for r in flat)
    ttfts = sorted(r["ttft"] for r in flat)
    steady = sorted(r["ttft"] for rs in records for r in rs[1:])
    decode_tokens = after["decode_tokens"] - before["decode_tokens"]
    decode_seconds = after["decode_seconds"] - before["decode_seconds"]
    return {
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "requests": len(flat),
        "tokens": sum(r["tokens"] for r in flat),
        "wall_s": round(wall, 3),
        "aggregate_tokens_per_s": round(sum(r["tokens"] for r in flat) / wall, 2),
        "decode_throughput_tokens_per_s": round(decode_tokens / decode_seconds, 2),
        "mean_decode_batch": round(
            decode_tokens / (after["decode_steps"] - before["decode_steps"]), 2
        ),
        "admission_share_of_engine_time": round(
            (after["prefill_seconds"] - before["prefill_seconds"])
            / (after["prefill_seconds"] - before["prefill_seconds"] + decode_seconds),
            3,
        ),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
        "ttft_p95_ms": round(1000 * percentile(ttfts, 95), 1),
        "ttft_p95_after_first_round_ms": round(1000 * percentile(steady, 95), 1)
        if steady
        else None,
        "per_client_tokens_per_s": round(
            statistics.median(
                sum(r["tokens"] for r in rs) / (rs[-1]["end"] - rs[0]["start"]) for rs in records
            ),
            2,
        ),
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q, method="linear"))


def prefix_reuse(model: Path, threads: int, runs: int) -> dict:
    """A conversation's second turn: time to first token with the prefix store and without."""
    from llava_edge.runtime import BatchEngine, Pipeline

    with Pipeline.load(model, threads=threads) as pipe:
        times: dict[str, list[float]] = {"reused": [], "recomputed": []}
        reused = 0
        for run in range(runs + 1):  # the first run warms up
            image = base64.b64decode(picture(10_000 + run).split(",", 1)[1])
            for name, budget in (("reused", 512), ("recomputed", 0)):
                with BatchEngine(pipe, max_batch=1, prefix_cache_mb=budget) as engine:
                    first = engine.submit(image, QUESTION, max_new_tokens=64, ignore_eos=True)
                    turns = [(QUESTION, first.result().text), ("And what else?", None)]
                    pixels = pipe.image_pixels(image)
                    ids = pipe.conversation_ids(turns, pixels, image_turn=0)
                    second = engine.submit_ids(ids, pixels, {"max_new_tokens": 1}).result()
                if run:
                    times[name].append(second.timings["first_token_ms"])
                    reused = max(reused, second.timings["prefix_reused"])
        return {
            "second_turn_prompt_tokens": len(ids),
            "prefix_tokens_reused": reused,
            "ttft_ms_reused": round(statistics.median(times["reused"]), 1),
            "ttft_ms_recomputed": round(statistics.median(times["recomputed"]), 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-edge-bench"))
    parser.add_argument("--model", type=Path, help="an exported model dir (default: small)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3, help="requests per client, in turn")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefix-runs", type=int, default=3)
    args = parser.parse_args()
    model = args.model or prepare(args.work)[1]
    load_before = os.getloadavg()
    server = Server(
        model,
        *("--threads", str(args.threads), "--model-name", "small"),
        *("--max-batch", str(max(args.clients)), "--max-queue", "64"),
    )
    runs: list[dict[int, dict]] = []
    try:
        one_request(server.url, picture(0), args.new_tokens)  # warm-up
        for repeat in range(args.repeats):
            runs.append(
                {
                    n: run_clients(server, n, args.rounds, args.new_tokens, 100_000 * repeat)
                    for n in args.clients
                }
            )
    finally:
        server.close()
    load_after = os.getloadavg()
    low, high = min(args.clients), max(args.clients)
    report = {
        "workload": {**vars(args), "work": str(args.work), "model": str(model)},
        "machine": {
            **bench.machine(),
            "load_avg_before": load_before,
            "load_avg_after": load_after,
        },
        "clients": {
            n: {key: median([run[n][key] for run in runs]) for key in runs[0][n]}
            for n in args.clients
        },
        "ratios": {
            f"decode_throughput_{high}_vs_{low}": median(
                [
                    r[high]["decode_throughput_tokens_per_s"]
                    / r[low]["decode_throughput_tokens_per_s"]
                    for r in runs
                ]
            ),
            f"aggregate_tokens_per_s_{high}_vs_{low}": median(
                [r[high]["aggregate_tokens_per_s"] / r[low]["aggregate_tokens_per_s"] for r in runs]
            ),
            f"ttft_p95_{high}_vs_{low}": median(
                [r[high]["ttft_p95_ms"] / r[low]["ttft_p95_ms"] for r in runs]
            ),
            f"ttft_p95_after_first_round_{high}_vs_{low}": median(
                [
                    r[high]["ttft_p95_after_first_round_ms"]
                    / r[low]["ttft_p95_after_first_round_ms"]
                    for r in runs
                    if r[low]["ttft_p95_after_first_round_ms"]
                ]
            ),
        },
        "targets": TARGETS,
        "prefix_reuse": prefix_reuse(model, args.threads, args.prefix_runs),
        "runs": runs,
    }
    print(json.dumps(report, indent=2))


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
