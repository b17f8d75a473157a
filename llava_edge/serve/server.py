"""Running the app under uvicorn: bind, load the model in the background, drain on SIGTERM.

uvicorn handles SIGTERM and SIGINT: it stops accepting connections, lets the requests in flight
finish (their streams included; at most `drain_timeout_s` when given), then runs the app's
shutdown, which closes the engine.
"""

from __future__ import annotations

import copy
import logging
import socket

import uvicorn

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest
from llava_edge.runtime.batching import prefix_budget
from llava_edge.runtime.onnx_backend import prompt_scales_per_call, provider_list
from llava_edge.serve.app import ServeOptions, create_app


def serve(
    options: ServeOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout_s: float | None = None,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM/SIGINT. A model that fails to load stops the server with its error."""
    if drain_timeout_s is not None and not drain_timeout_s >= 0:  # nan too
        raise LlavaEdgeError(f"--drain-timeout must be 0 or more seconds, got {drain_timeout_s}")
    manifest = Manifest.load(options.model_dir)  # a wrong dir fails here, before the port is taken
    if options.backend == "onnxruntime":  # TensorRT's int8 scales are static: prefixes reuse
        providers = provider_list(options.providers)
        prefix_budget(options.prefix_cache_mb, not prompt_scales_per_call(manifest, providers))
    sock = bind(host, port)  # a port in use fails here, before the model loads
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_load_error(error: BaseException) -> None:
        failure.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(options, on_load_error=stop_on_load_error)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout_s,
        lifespan="on",
        log_config=log_config(),
    )
    log = logging.getLogger("llava_edge.serve")
    log.setLevel(log_level.upper())
    # uvicorn names no address for a socket bound beforehand: the clients' URL is said here
    log.info(
        "llava-edge serve: listening on %s, model id %r; loading the model",
        api_url(sock),
        options.name,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if failure:
        error = failure[0]
        if isinstance(error, LlavaEdgeError):
            raise error
        raise LlavaEdgeError(f"the model failed to load: {error}") from error


def log_config() -> dict:
    """uvicorn's logging, with llava_edge.serve's lines (the address, the model ready, a
    stalled call at exit) on its stderr handler: without a handler, Python shows no INFO line."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["llava_edge.serve"] = {"handlers": ["default"]}
    return config


def api_url(sock: socket.socket) -> str:
    """The base URL clients give OpenAI's client (http://127.0.0.1:8000/v1), with the port
    bound (--port 0 takes a free one)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a clear error."""
    if not 0 <= port <= 65535:
        raise LlavaEdgeError(f"--port must be 0 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LlavaEdgeError(f"cannot listen on {host!r}: {e.strerror}") from None
    # IPv4 first, as uvicorn binds: "localhost" lists ::1 first on some systems, and a client
    # of 127.0.0.1 (the way a robot's other nodes often name this machine) would find nobody
    family, kind, proto, _, address = min(infos, key=lambda info: info[0] != socket.AF_INET)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise LlavaEdgeError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
        ) from None
    sock.listen(2048)
    return sock
