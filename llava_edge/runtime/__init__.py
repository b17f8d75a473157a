"""llava-edge's runtime: run an exported model dir with numpy, pillow, tokenizers and onnxruntime.

No torch and no transformers are imported here (tests hold this), so `pip install llava-edge`
is all a robot app needs.
"""

from llava_edge.errors import (
    BatchFailed,
    ChatFull,
    LlavaEdgeError,
    PromptTooLong,
    TimedOut,
    TooLarge,
)
from llava_edge.runtime.answer import Answer
from llava_edge.runtime.batching import BatchEngine, Cancelled, EngineClosed, QueueFull, Request
from llava_edge.runtime.pipeline import ChatSession, Limits, Pipeline, TextStream
from llava_edge.runtime.sampling import GenerationConfig

__all__ = [
    "Answer",
    "BatchEngine",
    "BatchFailed",
    "Cancelled",
    "ChatFull",
    "ChatSession",
    "EngineClosed",
    "GenerationConfig",
    "Limits",
    "LlavaEdgeError",
    "Pipeline",
    "PromptTooLong",
    "QueueFull",
    "Request",
    "TextStream",
    "TimedOut",
    "TooLarge",
]
