"""The transformers baseline for `llava-edge bench --baseline CHECKPOINT`: the same workload
through the checkpoint's transformers class's generate() (LlavaForConditionalGeneration or
LlavaNextForConditionalGeneration), same threads.

It lives with export because it needs torch and transformers, which the runtime never imports.
"""

from __future__ import annotations

import os
import time
from typing import Any

from llava_edge.export.verify import PLAIN_GREEDY
from llava_edge.runtime.bench import PeakMemory, Workload, bench_image


class TransformersRunner:
    """Times one request per `run_once`, as llava_edge.runtime.bench.PipelineRunner does."""

    name = "transformers"

    def __init__(self, checkpoint: str | os.PathLike, workload: Workload, prompt: str):
        import torch

        from llava_edge.modeling import load_model, load_processor

        torch.set_num_threads(workload.threads)
        self.workload, self.prompt, self.image = workload, prompt, bench_image()
        start = time.perf_counter()
        with PeakMemory() as memory:
            self.model = load_model(checkpoint, dtype=torch.float32, use_safetensors=True).eval()
            self.processor = load_processor(checkpoint)
            self.load_s = time.perf_counter() - start
            self.run_once()
        self.memory_mb = memory.megabytes

    def run_once(self) -> dict[str, float]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            """Notes when generate() hands over each token (the first call carries the prompt)."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, value: Any) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        start = time.perf_counter()
        inputs = self.processor(
            images=self.image if self.workload.image else None,
            text=self.prompt,
            return_tensors="pt",
        )
        with torch.no_grad():
            vision_start = time.perf_counter()
            if self.workload.image:  # LLaVA-NeXT also takes the image's size
                pixels = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
                self.model.get_image_features(**pixels)
            vision_end = time.perf_counter()
            self.model(**inputs, logits_to_keep=1)
            prefill_end = time.perf_counter()
            clock = Clock()
            generate_start = time.perf_counter()
            new = self.workload.new_tokens
            # plain greedy, as the runtime decodes, whatever generation_config.json sets; every
            # token asked for (min_new_tokens, which governs over min_length: given both,
            # generate() warns on every run)
            greedy = {**PLAIN_GREEDY, "min_new_tokens": new}
            del greedy["min_length"]
            self.model.generate(**inputs, max_new_tokens=new, streamer=clock, **greedy)
        first, last = clock.times[1], clock.times[-1]
        return {
            "preprocess_ms": (vision_start - start) * 1000,
            "vision_ms": (vision_end - vision_start) * 1000,
            # the forward runs the vision tower again: its time, measured just before, comes off
            # (the runtime's prefill is the language model's alone)
            "prefill_ms": max(prefill_end - vision_end - (vision_end - vision_start), 0.0) * 1000,
            # as the runtime counts it: preprocessing, then generate() up to the first token
            "ttft_ms": (vision_start - start + first - generate_start) * 1000,
            "decode_tokens_per_s": (len(clock.times) - 2) / (last - first),
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
        }

    def close(self) -> None:
        del self.model
