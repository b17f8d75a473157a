"""Where a request's image comes from: a base64 `data:` URI of an image media type or none
(always), a local file under the allowed media dir (only when one is given), or an http(s) URL
(only with remote images allowed, its size and time capped). Each way yields the image's bytes,
which the runtime then decodes and checks (the format is read from the bytes, whatever a media
type says).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import ParseResult, unquote, urlparse

from llava_edge.errors import first_line
from llava_edge.runtime.image import base64_format
from llava_edge.serve.protocol import ApiError, shown

OCTET_STREAM = "application/octet-stream"  # bytes of no declared type: taken, as no type is


@dataclass
class MediaPolicy:
    max_image_bytes: int
    allowed_media_dir: Path | None = None
    allow_remote: bool = False
    remote_timeout_s: float = 10.0


async def fetch_image(url: str, policy: MediaPolicy, time_left: float | None = None) -> bytes:
    """The bytes of the image at `url`, or an ApiError saying why not. Decoding base64 and
    reading files (megabytes) run off the event loop, which other clients' streams share.
    time_left: what remains of the request's time limit; a download may not take longer."""
    if url[:5].lower() == "data:":  # a URL's scheme is case-insensitive
        return await asyncio.to_thread(_data_uri, url, policy.max_image_bytes)
    _refuse_bare_base64(url)
    scheme = _parse(url).scheme.lower()
    if scheme == "file" or (not scheme and url.startswith("/")):
        return await asyncio.to_thread(_local_file, url, policy)
    if scheme in ("http", "https"):
        return await _remote(url, policy, time_left)
    raise ApiError(
        400,
        "image_url must be a data: URI (base64), a file:// URL under the server's "
        "--allowed-media-dir, or an http(s) URL with --allow-remote-images",
        "image_url",
    )


def _refuse_bare_base64(url: str) -> None:
    """An image's base64 without its data: header, as other APIs take images: a JPEG's begins
    with /9j/, which reads as a file path."""
    fmt = base64_format(url)
    if fmt is not None:
        raise ApiError(
            400,
            f"image_url holds bare base64 of a {fmt} image; send it as a data: URI: "
            f"data:image/{fmt.lower()};base64,<the base64>",
            "image_url",
        )


def _parse(url: str) -> ParseResult:
    try:
        return urlparse(url)
    except ValueError as e:  # an unclosed IPv6 bracket, say
        raise ApiError(400, f"image_url is not a valid URL ({e})", "image_url") from None


def _data_uri(url: str, limit: int) -> bytes:
    header, sep, payload = url.partition(",")
    media_type, *params = header[len("data:") :].split(";")
    if not sep or not params or params[-1].strip().lower() != "base64":
        raise ApiError(
            400, "a data: image URL must be base64: data:image/png;base64,...", "image_url"
        )
    # PIL reads the format from the bytes, so any image type will do, or none (as some clients
    # send); a type that is no image's is the client's mistake, said before decoding
    media_type = media_type.strip().lower()
    if media_type and not media_type.startswith("image/") and media_type != OCTET_STREAM:
        raise ApiError(
            400,
            f"the data: URL's media type is {media_type}, not an image; send an image as "
            "data:image/png;base64,... (or image/jpeg, image/webp)",
            "image_url",
        )
    if any(c in payload for c in "\r\n \t"):
        payload = "".join(payload.split())  # line-wrapped base64 (MIME, `base64` without -w0)
    size = _decoded_size(payload)  # refuse an oversized image before decoding it
    if size > limit:
        raise _too_large(size, limit)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400,
            "the data: image URL is not valid base64 (the standard alphabet A-Z a-z 0-9 + /, "
            "padded with =)",
            "image_url",
        ) from None


def _local_file(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_media_dir is None:
        raise ApiError(
            400,
            "local image files are off; start the server with --allowed-media-dir DIR to allow "
            "files under DIR",
            "image_url",
        )
    parsed = _parse(url)
    if parsed.scheme and parsed.netloc not in ("", "localhost"):
        raise ApiError(400, f"file URL {shown(url)} names a host; use file:///path", "image_url")
    path = Path(unquote(parsed.path if parsed.scheme else url))
    root = policy.allowed_media_dir.resolve()
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the path
        raise ApiError(400, f"image file {path} does not exist", "image_url") from None
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise ApiError(
            400, f"image file {path} is not a file under the allowed media dir", "image_url"
        )
    size = os.path.getsize(resolved)
    if size > policy.max_image_bytes:
        raise _too_large(size, policy.max_image_bytes)
    # at most one byte past the limit: a file a camera is still writing may have grown since
    with open(resolved, "rb") as f:
        data = f.read(policy.max_image_bytes + 1)
    if len(data) > policy.max_image_bytes:
        raise _too_large(os.path.getsize(resolved), policy.max_image_bytes)
    return data


async def _remote(url: str, policy: MediaPolicy, time_left: float | None) -> bytes:
    if not policy.allow_remote:
        raise ApiError(
            400,
            "remote images are off; start the server with --allow-remote-images, or send the "
            "image as a data: URI",
            "image_url",
        )
    import httpx

    budget = policy.remote_timeout_s
    late = time_left is not None and time_left < budget  # the request's limit comes first
    if late:
        budget = max(time_left, 0.0)
    try:  # one deadline for the whole download: a server sending a byte at a time gains nothing
        return await asyncio.wait_for(_download(url, policy), budget)
    except ApiError:
        raise
    except (asyncio.TimeoutError, httpx.TimeoutException):
        if late:
            raise ApiError(
                504,
                "the request ran past its time limit fetching its image",
                "image_url",
                "timeout",
            ) from None
        raise ApiError(
            400, f"fetching the image took over {policy.remote_timeout_s} s", "image_url"
        ) from None
    except Exception as e:  # httpx's errors, and the URLs it cannot even try (a bad host name
        # or port surfaces as InvalidURL, IDNA's ValueError, or an ExceptionGroup from anyio)
        raise ApiError(400, f"cannot fetch the image: {first_line(e)}", "image_url") from None


async def _download(url: str, policy: MediaPolicy) -> bytes:
    import httpx

    limit = policy.max_image_bytes
    # no timeout of httpx's own (5 s a phase by default): the whole download's deadline, set by
    # --remote-timeout, is the caller's. The body is asked for and read as it is sent, so that
    # the limit counts what arrives: httpx inflates a gzipped piece whole (64 KB to 64 MB).
    async with (
        httpx.AsyncClient(follow_redirects=True, max_redirects=3, timeout=None) as client,
        client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response,
    ):
        if response.status_code != 200:
            raise ApiError(400, f"fetching the image gave HTTP {response.status_code}", "image_url")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ApiError(
                400,
                f"the image's server sent it compressed ({encoding}) though asked not to; "
                "send the image as a data: URI",
                "image_url",
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        data = bytearray()
        async for piece in response.aiter_raw():
            data += piece
            if len(data) > limit:
                raise _too_large(len(data), limit)
        return bytes(data)


def _decoded_size(payload: str) -> int:
    """The bytes of base64 `payload` (its exact count where base64.b64decode takes it): 6 bits
    for each character before the '=' padding, which b64decode takes only at the end and takes
    past the 1 or 2 a 4-character group needs ('QUFB=' decodes to 3 bytes)."""
    return len(payload.rstrip("=")) * 3 // 4


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the image is {size} bytes, over this server's limit of {limit}; downscale it",
        "image_url",
        "image_too_large",
    )
