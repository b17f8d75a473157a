"""The interactive loop behind `llava-edge chat`: read a question, stream the answer, repeat.

Commands: /image PATH starts a new conversation about another image, /add PATH brings an
image (a camera's next frame) with the next question in the same conversation, /reset starts
over, /help repeats them, /quit (or end of input) leaves; another /word is refused rather than asked
(a question may still start with a path, /usr/...). A bad question or image prints its error
and the chat goes on;
a question whose answer failed halfway (a timeout) is forgotten, as ChatSession rolls it back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, TextIO

from llava_edge.errors import ChatFull, LlavaEdgeError
from llava_edge.runtime.anyres import check_several

COMMANDS = (
    "/add PATH: an image for the next question, /reset: start over, /help: this, /quit: leave."
)


def help_text(image: Any) -> str:
    if image is None or (isinstance(image, list) and not image):
        return f"Ask anything (no image). /image PATH: talk about an image, {COMMANDS}"
    return f"Ask about the image. /image PATH: another image, {COMMANDS}"


def chat_loop(
    pipe: Any,
    image: str | list[str] | None,
    options: dict[str, Any],
    read: Callable[[str], str],
    out: TextIO,
) -> None:
    session = pipe.chat(image, **options)  # a bad image ends the chat before its greeting
    out.write(help_text(image) + "\n")
    # images the next question brings (/add), with their sizes: what a later /add checks them by
    added: list[tuple[str, tuple[int, int]]] = []
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            out.write("\n")
            return
        if not line:
            continue
        word, _, rest = line.partition(" ")
        if word in ("/quit", "/exit"):
            return
        if word == "/help":
            out.write(help_text(image) + "\n")
            continue
        if re.fullmatch(r"/[A-Za-z]+", word) and word not in ("/reset", "/image", "/add"):
            out.write(f"error: unknown command {word}; {help_text(image)}\n")
            continue
        partial = False
        try:
            if word == "/reset":
                session, added = pipe.chat(image, **options), []
                out.write("(new conversation)\n")
            elif word == "/add":
                path = _image_path(rest)
                if path is None:
                    raise LlavaEdgeError("/add takes the path of an image: /add PATH")
                # a bad image is said now, not with the question, and so is one the
                # conversation cannot hold with its others (LLaVA-OneVision pads each of several
                # to a square), told from their sizes
                size = pipe.image_pixels(path).size
                held = [*(one.size for one in session.pixels), *(s for _, s in added), size]
                check_several(held, pipe.manifest.image)
                added.append((path, size))
                out.write(f"(the next question brings {path})\n")
            elif word == "/image":
                new = _image_path(rest)
                session, added = pipe.chat(new, **options), []
                image = new  # only once it opened: /reset goes on with a good image
                out.write(f"(new conversation about {image or 'no image'})\n")
            else:
                # they go with this question, answered or not
                brought, added = [path for path, _ in added], []
                for piece in session.stream(line, image=brought or None):
                    out.write(piece)
                    out.flush()
                    partial = True
                out.write("\n")
        except LlavaEdgeError as e:
            hint = " (/reset)" if isinstance(e, ChatFull) else ""
            out.write(("\n" if partial else "") + f"error: {e}{hint}\n")
        except KeyboardInterrupt:  # Ctrl-C leaves the chat; the answer's line ends first
            if partial:
                out.write("\n")
            raise


def _image_path(text: str) -> str | None:
    """The path after /image as a terminal pastes it: a dropped file comes quoted, and `~` is
    the home dir (the shell that would expand it is not in the loop); none: no image."""
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return os.path.expanduser(text) if text else None
