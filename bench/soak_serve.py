"""Soak test of `llava-edge serve`: 1,000 mixed requests from concurrent clients, as JSON.

    .venv/bin/python bench/soak_serve.py [--model DIR] [--requests 1000] [--clients 6]

Without --model it builds the tiny model in a temporary dir. The server runs in a subprocess
(--max-batch 4); the clients send, in a fixed mix, whole and streamed answers about new images,
two-turn conversations, text-only and sampled requests, streams they drop after a few chunks,
requests they give up on before the answer, and bad requests (broken JSON, a broken image, an
unknown model, an oversized body, n=2). It passes when every good request is answered in full,
every bad one gets a 4xx with OpenAI's error JSON, the server's resident memory grows by under
10% after warm-up (the first 10% of requests), its open files do not grow, and when the clients
are done no row is left running and no request waiting.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from bench_serve import Server  # bench/ is on the path of a script run from it
from PIL import Image
from soak import build_tiny

KINDS = [
    "image",
    "image_stream",
    "conversation",
    "text",
    "sampled",
    "dropped_stream",
    "image",
    "given_up",
    "bad",
    "image_stream",
]
BAD = [
    b"{not json",
    {
        "model": "soak",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
                ],
            }
        ],
    },
    {"model": "other", "messages": [{"role": "user", "content": "Hi"}]},
    {"model": "soak", "messages": [{"role": "user", "content": "x" * 3_000_000}]},
    {"model": "soak", "messages": [{"role": "user", "content": "Hi"}], "n": 2},
]


def picture(seed: int) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(text: str, image: str | None = None) -> dict:
    content: list[dict] = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"role": "user", "content": content}


class Soak:
    def __init__(self, url: str):
        self.url = url + "/v1/chat/completions"
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)

    def request(self, client: httpx.Client, i: int) -> None:
        kind = KINDS[i % len(KINDS)]
        self.count(kind)
        body = {"model": "soak", "max_tokens": 24}
        if kind == "image":
            self.whole(client, i, {**body, "messages": [ask("What is it?", picture(i))]})
        elif kind == "image_stream":
            self.stream(client, i, {**body, "messages": [ask("Describe it.", picture(i))]})
        elif kind == "conversation":
            messages = [ask("What is it?", picture(i))]
            answer = self.whole(client, i, {**body, "messages": messages})
            if answer is not None:
                messages += [{"role": "assistant", "content": answer}, ask("And then?")]
                self.whole(client, i, {**body, "messages": messages})
        elif kind == "text":
            self.whole(client, i, {**body, "messages": [ask("Say something.")]})
        elif kind == "sampled":
            sampled = {"temperature": 0.8, "top_p": 0.9, "seed": i}
            self.stream(client, i, {**body, **sampled, "messages": [ask("Hm?", picture(i))]})
        elif kind == "dropped_stream":
            long = {**body, "max_tokens": 400, "ignore_eos": True, "stream": True}
            with client.stream("POST", self.url, json={**long, "messages": [ask("Go on.")]}) as r:
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
            # leaving the block closes the connection mid-answer
        elif kind == "given_up":
            long = {**body, "max_tokens": 400, "ignore_eos": True}
            with contextlib.suppress(httpx.TimeoutException):  # the client gives up, leaves
                client.post(self.url, json={**long, "messages": [ask("Long?")]}, timeout=0.05)
        else:
            bad = BAD[(i // len(KINDS)) % len(BAD)]
            sent = {"content": bad} if isinstance(bad, bytes) else {"json": bad}
            response = client.post(self.url, **sent)
            if not 400 <= response.status_code < 500 or "error" not in response.json():
                self.fail(f"request {i} (bad): {response.status_code} {response.text[:200]}")

    def whole(self, client: httpx.Client, i: int, body: dict) -> str | None:
        response = client.post(self.url, json=body)
        if response.status_code != 200:
            self.fail(f"request {i}: {response.status_code} {response.text[:200]}")
            return None
        return response.json()["choices"][0]["message"]["content"]

    def stream(self, client: httpx.Client, i: int, body: dict) -> None:
        with client.stream("POST", self.url, json={**body, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        if response.status_code != 200 or lines[-1] != "data: [DONE]":
            self.fail(f"request {i} (stream): {response.status_code} {lines[-2:]}")
        elif any('"error"' in line for line in lines):
            self.fail(f"request {i} (stream): {lines[-2]}")


def server_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def engine_state(url: str) -> dict[str, float]:
    """Rows in use, requests waiting, and how many requests were cancelled (clients gone)."""
    names = ("running", "waiting", "cancelled_total")
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name.removeprefix("llava_edge_engine_") in names:
            out[name.removeprefix("llava_edge_engine_")] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    if not 1 <= args.every <= args.requests:  # no sample, no report
        parser.error(f"--every must be 1 to --requests ({args.requests}), got {args.every}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny(Path(tmp))
        server = Server(
            model,
            *("--model-name", "soak", "--max-batch", "4", "--max-queue", "64"),
            *("--max-body-mb", "1", "--threads", "2"),
        )
        try:
            report = soak(server.url, server.process.pid, args)
        finally:
            server.close()
    print(json.dumps(report, indent=2))


def soak(url: str, pid: int, args: argparse.Namespace) -> dict:
    run = Soak(url)
    numbers = iter(range(args.requests))
    lock = threading.Lock()
    samples: list[dict] = []
    done = [0]
    start = time.time()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    i = next(numbers, None)
                if i is None:
                    return
                try:
                    run.request(http, i)
                except Exception as e:  # a transport error on a good request is a failure
                    run.fail(f"request {i}: {type(e).__name__}: {e}")
                with lock:
                    done[0] += 1
                    if done[0] % args.every == 0:
                        samples.append(
                            {
                                "requests": done[0],
                                "rss_mb": round(server_rss_mb(pid), 1),
                                "open_files": len(os.listdir(f"/proc/{pid}/fd")),
                            }
                        )

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - start
    state = {}
    for _ in range(50):  # a dropped request leaves at the engine's next step
        state = engine_state(url)
        if not state["running"] and not state["waiting"]:
            break
        time.sleep(0.1)
    warm = next(s for s in samples if s["requests"] >= args.requests // 10)
    last = samples[-1]
    report = {
        "requests": args.requests,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "kinds": run.counts,
        "failures": run.failures[:20],
        "failure_count": len(run.failures),
        "samples": samples,
        "rss_growth_after_warmup": round(last["rss_mb"] / warm["rss_mb"] - 1, 4),
        "open_files_growth_after_warmup": last["open_files"] - warm["open_files"],
        "engine_after": state,
    }
    report["passed"] = (
        not run.failures
        and report["rss_growth_after_warmup"] < 0.10
        and report["open_files_growth_after_warmup"] <= 0
        and not state["running"]
        and not state["waiting"]
    )
    return report


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
