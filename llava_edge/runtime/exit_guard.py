"""The process's exit waits for the backend calls in flight, and lets no new one start.

An app's thread may still be inside a `Pipeline` call (a daemon worker answering, a robot node
shut down mid-answer) when the interpreter exits. Native code running on through the exit aborts
the process: onnxruntime's thread pools are torn down under the call ("terminate called without
an active exception", exit 134). So each backend call (`guarded`) is counted, and at exit the
calls in flight are waited for, EXIT_WAIT_S at most, while a thread that would start a new one
is parked for good: it never re-enters native code, and the exit goes on without it. The thread
running the exit is never parked: an app's own exit handler that runs after this one (registered
before the runtime was imported) may still ask the model, before the interpreter ends. Nothing
else in the standard library or onnxruntime does this: `threading`'s own exit joins only
non-daemon threads, and onnxruntime has no shutdown call.
"""

from __future__ import annotations

import atexit
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_WAIT_S = 10.0  # how long the exit waits for the backend calls in flight

_calls = threading.Condition()
_in_flight = 0
_exit_thread: threading.Thread | None = None  # the thread running the exit, once it began
_before_exit: list[Callable[[], None]] = []

Call = TypeVar("Call", bound=Callable[..., Any])


def guarded(method: Call) -> Call:
    """A backend method whose native call the process's exit waits for."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        global _in_flight
        with _calls:
            parked = _exit_thread not in (None, threading.current_thread())
            if not parked:
                _in_flight += 1
        if parked:
            threading.Event().wait()  # never set: parked until the process is gone
        try:
            return method(*args, **kwargs)
        finally:
            with _calls:
                _in_flight -= 1
                _calls.notify_all()

    return call  # type: ignore[return-value]


def running_exit() -> bool:
    """Whether this thread runs the exit, begun: the one thread whose backend calls go on. It
    must not wait for another thread's work, which may be parked for good."""
    return _exit_thread is threading.current_thread()


def before_exit(step: Callable[[], None]) -> None:
    """Run `step` at exit before the backend calls are stopped (a BatchEngine cancels its
    requests and ends its thread, which needs the backend to finish its call)."""
    _before_exit.append(step)


@atexit.register
def _wait_for_calls() -> None:
    global _exit_thread
    for step in _before_exit:
        step()
    with _calls:
        _exit_thread = threading.current_thread()
        _calls.wait_for(lambda: _in_flight == 0, timeout=EXIT_WAIT_S)
