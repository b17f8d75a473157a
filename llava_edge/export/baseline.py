"""The transformers baseline for `llava-edge bench --baseline CHECKPOINT`: the same workload
through LlavaForConditionalGeneration.generate() on the source checkpoint, same threads.

It lives with export because it needs torch and transformers, which the runtime never imports.
"""

from __future__ import annotations

import os
import time
from typing import Any

from llava_edge.runtime.bench import PeakMemory, Workload, medians, bench_image


def bench_transformers(
    checkpoint: str | os.PathLike, workload: Workload, prompt: str
) -> dict[str, Any]:
    """Medians of vision ms, prefill ms, time to first token and decode tokens/s in transformers."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(workload.threads)
    start = time.perf_counter()
    with PeakMemory() as memory:
        model = LlavaForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32
        ).eval()
        processor = AutoProcessor.from_pretrained(checkpoint)
        load_s = time.perf_counter() - start

        class Clock(BaseStreamer):
            """Notes when generate() hands over each token (the first call carries the prompt)."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, value: Any) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        runs = []
        for _ in range(workload.warmup + workload.runs):
            request_start = time.perf_counter()
            inputs = processor(images=bench_image(), text=prompt, return_tensors="pt")
            with torch.no_grad():
                vision_start = time.perf_counter()
                model.get_image_features(inputs["pixel_values"])
                vision_ms = (time.perf_counter() - vision_start) * 1000
                prefill_start = time.perf_counter()
                model(**inputs, logits_to_keep=1)
                prefill_ms = (time.perf_counter() - prefill_start) * 1000
                clock = Clock()
                generate_start = time.perf_counter()
                model.generate(
                    **inputs,
                    max_new_tokens=workload.new_tokens,
                    min_new_tokens=workload.new_tokens,
                    do_sample=False,
                    streamer=clock,
                )
            first, last = clock.times[1], clock.times[-1]
            runs.append(
                {
                    "preprocess_ms": (vision_start - request_start) * 1000,
                    "vision_ms": vision_ms,
                    "prefill_ms": prefill_ms,
                    "ttft_ms": (first - generate_start + vision_start - request_start) * 1000,
                    "decode_tokens_per_s": (len(clock.times) - 2) / (last - first),
                }
            )
    report = medians(runs[workload.warmup :])
    report.update(load_s=round(load_s, 3), peak_memory_mb=memory.megabytes)
    report["prompt_tokens"] = int(inputs["input_ids"].shape[1])
    return report
