"""`llava-edge serve`: an OpenAI-compatible HTTP server over the runtime.

    pip install 'llava-edge[serve]'
    llava-edge serve model/ --port 8000

A layer over the runtime: it imports llava_edge.runtime, nothing in the runtime imports it, and
its web stack (Starlette, uvicorn, httpx, prometheus-client) is the `[serve]` extra. Requests
from all clients are decoded together by the runtime's BatchEngine.
"""

from __future__ import annotations

from llava_edge.serve.app import ServeOptions, create_app
from llava_edge.serve.server import serve

__all__ = ["ServeOptions", "create_app", "serve"]
