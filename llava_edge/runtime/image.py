"""Image loading and preprocessing in numpy and PIL, equal to transformers' CLIPImageProcessor
and SiglipImageProcessor.

The runtime cannot import transformers, so the processor's steps are replayed here from the
numbers export wrote into the manifest: convert to RGB (transparency over white), optionally pad
to a square with the mean colour (LLaVA-1.5 'pad'), resize with PIL (CLIP: the shortest edge,
the longest kept within longest_edge where one is set, then a center crop; SigLIP: straight to
the square, no crop), rescale, normalize. Tests hold this to transformers' output within 1e-5.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import stat
import threading
import urllib.parse
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from llava_edge.errors import LlavaEdgeError, TooLarge
from llava_edge.manifest import ImageSpec

_FILTERS = threading.Lock()  # held while the warning filters are changed (see _open)
# The most pixels padding or resizing may make of an image (beyond twice its own): 192 MB in uint8.
STEP_PIXELS = 64_000_000
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray
# No image, one, or several for one prompt (in the order of their placeholders): a list, a
# tuple or any other sequence of them (a deque of a camera's last frames). Sequence, not list:
# a type checker takes an app's list[np.ndarray] for it, where list[ImageInput] is invariant.
Images = ImageInput | Sequence[ImageInput] | None


def image_list(images: Images) -> list[ImageInput]:
    """No image, one, or several, as a list. An image Pipeline.image_pixels prepared is refused,
    naming where it goes."""
    from llava_edge.runtime.anyres import ImagePixels  # anyres builds on this module

    if images is None:
        return []
    text_or_bytes = str | bytes | bytearray | memoryview  # one image, though sequences too
    several = isinstance(images, Sequence) and not isinstance(images, text_or_bytes)
    listed = list(images) if several else [images]
    if any(isinstance(one, ImagePixels) for one in listed):
        raise LlavaEdgeError(
            "an image prepared by Pipeline.image_pixels goes to prompt_ids, pixel_features or "
            "BatchEngine.submit_ids; generate, answer, stream, chat and BatchEngine.submit take "
            "the image itself (a path, bytes, a PIL image or an array)"
        )
    return listed


def load_image(source: ImageInput, max_pixels: int | None = None) -> Image.Image:
    """Open anything a robot app holds as an RGB PIL image.

    Paths and bytes are decoded with PIL (first frame of an animation, EXIF rotation applied;
    any format PIL reads but PostScript and the icon formats: see UNREAD_FORMATS). A PIL image
    is taken as it is, its EXIF orientation not applied, as transformers' processors take it
    (`ImageOps.exif_transpose` it first).
    Arrays are (H, W, 3) RGB, (H, W, 4) RGBA (transparency over white), or (H, W) and (H, W, 1)
    grey, channels last: a channels-first (3, H, W) array is refused, and so is an encoded file
    held in an array (cv2.imencode's output: pass `array.tobytes()`). Channels are read in RGB
    order whatever the source (OpenCV's frames are BGR: pass `frame[..., ::-1]`). Torch tensors
    are not taken: pass `tensor.permute(1, 2, 0).numpy()` in one of the forms below.

    Pixel values follow one rule, whether they come as an array or as a PIL image of the same
    values (what `Image.fromarray` makes of the array), so that the form never changes the
    picture:
    - uint8 (PIL modes L, RGB, RGBA, ...): 0-255.
    - uint16 (PIL modes I;16, I;16B, and a 16-bit PGM file, which PIL opens as mode I): 0-65535,
      the top 8 bits kept. 10- or 12-bit data in a 16-bit container comes out dark: shift it up
      first (`frame << 4` for 12 bits).
    - other integers (int8 to int64, uint32, uint64, PIL mode I): 0-255, else refused.
    - floats (float16 to float64, PIL mode F): [0, 1], times 255 rounded, else refused.
    - bool (PIL mode 1): False black, True white.
    A scale is never read off the values (one bright pixel would change the whole picture): what
    fits none of these is refused with a LlavaEdgeError saying what to give instead.

    An image of more than `max_pixels` pixels is refused whatever its form, a file before it is
    decoded (that limit, not PIL's own MAX_IMAGE_PIXELS, governs; without one, a file over PIL's
    is refused).
    """
    if isinstance(source, np.ndarray):
        _refuse_encoded(source)
        if source.ndim >= 2 and source.size:  # the shape and emptiness are checked next
            _check_pixels(source.shape[1], source.shape[0], max_pixels)
        return _from_array(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels)
        image = source
    elif isinstance(source, bytearray | memoryview):
        image = _open(bytes(source), max_pixels)
    elif isinstance(source, str | os.PathLike | bytes):
        image = _open(source, max_pixels)
    else:
        # a torch tensor and other array-likes are refused: their layout is channels first
        hint = "; convert it to a channels-last numpy array" if hasattr(source, "__array__") else ""
        raise LlavaEdgeError(
            "an image is a path, bytes, a PIL image or an (H, W[, C]) numpy array, got "
            f"{type(source).__name__}{hint}"
        )
    try:
        if isinstance(source, Image.Image):
            _check_open(image)
            image.load()  # a lazily opened file decodes here, not later outside this check
            return to_rgb(image)
        return _upright(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise LlavaEdgeError(f"cannot decode image: {e}") from None


# The turn ImageOps.exif_transpose (transformers' load_image) gives each EXIF orientation.
_EXIF_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image) -> Image.Image:
    """A decoded file as RGB, turned by its EXIF orientation as ImageOps.exif_transpose turns
    it. Only the pixels are kept: exif_transpose also writes the metadata back, which raises
    (TypeError, struct.error) on a tag PIL reads but cannot write, a camera's tag of another type
    than the standard's, in a picture that decodes. Made RGB first, while the file's format is
    known (a 16-bit PGM's mode I reads by it)."""
    turn = _EXIF_TURNS.get(exif_orientation(image))
    rgb = to_rgb(image)
    return rgb if turn is None else rgb.transpose(turn)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened file (1, upright, where it has none), as `load_image`
    turns it. EXIF whose header PIL cannot read gives none, as PIL reads a JPEG's (a WebP's
    raises)."""
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1)
    except SyntaxError:  # "not a TIFF file": the EXIF block's header is not one
        return 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The width and height `load_image` gives an opened file, from its header: those of a
    picture stored turned a quarter (EXIF orientation 5 to 8) swapped."""
    width, height = image.size
    if exif_orientation(image) in (5, 6, 7, 8):
        return height, width
    return width, height


def _check_open(image: Image.Image) -> None:
    """A PIL image still to be decoded (tiles left) needs its file: after `with Image.open(...)`
    it is closed, and PIL's load fails on a bare assertion."""
    if isinstance(image, ImageFile.ImageFile) and image.tile and image.fp is None:
        raise LlavaEdgeError(
            "cannot decode image: its file was closed before the image was read (the end of "
            "a `with Image.open(...)` block); pass the path, or call image.load() before the "
            "file closes"
        )


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise TooLarge(
            f"image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels}; "
            "downscale it first"
        )
    if pixels == 0:
        raise LlavaEdgeError("image has no pixels")


def _open(source: str | os.PathLike | bytes, max_pixels: int | None) -> Image.Image:
    given = isinstance(source, bytes)
    name = "the image data" if given else str(source)
    if len(name) > 200:  # a base64 string passed for a path: a megabyte of error
        name = name[:100] + "..."
    what = name if given else f"image {name}"
    mode = 0
    if not given:
        _refuse_url(source)
        if not os.path.exists(source):
            _refuse_file_url(source)
            _refuse_base64(source, name)
            raise LlavaEdgeError(f"{what} does not exist")
        if os.path.isdir(source):
            raise LlavaEdgeError(f"{what} is a directory, not an image file")
        mode = os.stat(source).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):  # a camera's read may block for ever
            raise LlavaEdgeError(
                f"{what} is a device, not an image file; a camera's frames are read with "
                f"`llava-edge watch --source {name}` (Pipeline.watch)"
            )
        if os.path.isfile(source) and os.path.getsize(source) == 0:  # a pipe's size is 0 too
            raise LlavaEdgeError(f"{what} is an empty file")
    elif not source:
        raise LlavaEdgeError("the image data is empty")
    pipe = None
    try:
        if given:
            file = io.BytesIO(source)
        elif stat.S_ISFIFO(mode):  # opened here: the open waits for a writer, not under the lock
            file = pipe = open(source, "rb")  # noqa: SIM115 (closed below, once decoded)
        else:
            file = source
        image = _open_within(file, max_pixels, what)
        image.load()  # decode now, so truncation is found here and not later
        return image
    except UnidentifiedImageError:
        raise _unidentified(source, name, mode) from None
    except PermissionError:
        raise LlavaEdgeError(f"no permission to read {what}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise LlavaEdgeError(f"{what} is corrupt or truncated ({e})") from None
    finally:
        if pipe is not None:
            pipe.close()


def _unidentified(source: str | os.PathLike | bytes, name: str, mode: int) -> LlavaEdgeError:
    """What a file PIL cannot identify is, where it is something else than an image: a video
    (given to `run --image`), or an image's base64 text, bare or as a data: URI (`base64 img |
    llava-edge run --image -`, a client's base64 encoded twice). A pipe was read by PIL, so its
    bytes are not looked at."""
    if isinstance(source, bytes):
        head = source[:VIDEO_HEAD]
    elif stat.S_ISREG(mode):
        with open(source, "rb") as file:
            head = file.read(VIDEO_HEAD)
    else:
        head = b""
    video = video_format(head)
    if video is not None and isinstance(source, bytes):
        return LlavaEdgeError(
            f"{name} is a video ({video}), not an image; `llava-edge watch --source -` answers "
            "about a video piped in (Pipeline.watch about a video file)"
        )
    if video is not None:
        return LlavaEdgeError(
            f"{name} is a video ({video}), not an image; `llava-edge watch --source {name}` "
            "(Pipeline.watch) answers about its frames"
        )
    if head[:5].lower() == b"data:":
        return LlavaEdgeError(
            f"{name} is a data: URI, not the image: `base64 -d` its text after the comma (in "
            "Python, base64.b64decode(uri.split(',')[1]))"
        )
    fmt = base64_format(head[:16].decode("latin-1"))
    if fmt is not None:
        return LlavaEdgeError(
            f"{name} is base64 text of a {fmt} image, not the image: `base64 -d` decodes it "
            "(in Python, base64.b64decode)"
        )
    return LlavaEdgeError(
        f"{name} is not an image PIL can read ({', '.join(UNREAD_FORMATS)} files are not "
        "read: convert them to PNG or JPEG)"
    )


def _refuse_url(source: str | os.PathLike) -> None:
    """transformers' load_image takes URLs and data: URIs; the runtime reads no network."""
    text = os.fspath(source)
    if not isinstance(text, str):
        return
    scheme = text[:8].lower()
    if scheme.startswith("data:"):
        raise LlavaEdgeError(
            "a data: URI is not an image file: `base64 -d` its text after the comma into a file "
            "and give that (in Python, pass base64.b64decode(uri.split(',')[1]))"
        )
    if scheme.startswith(("http://", "https://")):
        shown = text if len(text) <= 100 else text[:100] + "..."
        raise LlavaEdgeError(
            f"{shown} is a URL, not an image file; download it and pass the file or its bytes "
            "(the runtime reads no network)"
        )


def _refuse_file_url(source: str | os.PathLike) -> None:
    """A file:// URL, as serve's image_url and watch's source take one, is no path: said so, not
    that it does not exist."""
    text = os.fspath(source)
    if isinstance(text, str) and text[:7].lower() == "file://":
        path = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
        raise LlavaEdgeError(f"{text} is a file:// URL, not a path; pass the path it names: {path}")


def _refuse_base64(source: str | os.PathLike, name: str) -> None:
    """transformers' load_image takes an image's bare base64 too; here it is no path."""
    text = os.fspath(source)
    fmt = base64_format(text) if isinstance(text, str) else None
    if fmt is not None:
        raise LlavaEdgeError(
            f"{name} is base64 of a {fmt} image, not a path: `base64 -d` it into a file and give "
            "that (in Python, pass base64.b64decode(text))"
        )


def _open_within(
    file: str | os.PathLike | io.BytesIO, max_pixels: int | None, what: str
) -> Image.Image:
    """Open an image file, refused from its header alone when over `max_pixels`.

    PIL has a limit of its own, MAX_IMAGE_PIXELS (89M: a warning past it, an error past twice
    it), that it checks as it opens a file and again as some formats decode (GIF frames, TIFF
    tiles). Ours governs: PIL's warning is ignored, and where ours is larger, PIL's is lifted to
    it until the image is decoded. Without a limit of ours, PIL's warning is an error.
    """
    pil_limit = Image.MAX_IMAGE_PIXELS
    lift = max_pixels is not None and pil_limit is not None and max_pixels > pil_limit
    # catch_warnings swaps the process's filters, and PIL's limit is a global: threads
    # overlapping here would leave either changed for the whole app. Only the header is read
    # under the lock, unless PIL's limit is lifted (its later checks then need it).
    with _FILTERS, warnings.catch_warnings():
        warnings.simplefilter(
            "error" if max_pixels is None else "ignore", Image.DecompressionBombWarning
        )
        if lift:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            image = Image.open(file, formats=_readable_formats())
            try:
                _check_pixels(image.width, image.height, max_pixels)
                if lift:
                    image.load()
            except BaseException:
                image.close()
                raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            if max_pixels is None:  # PIL's limit guards against decompression bombs
                raise TooLarge(
                    f"{what} has more pixels than PIL's decompression-bomb limit ({pil_limit}); "
                    "downscale it, or allow it with a pixel limit (max_image_pixels, "
                    "--max-image-pixels)"
                ) from None
            raise TooLarge(  # past twice PIL's limit as it stands, so at least twice ours
                f"{what} has more than {2 * Image.MAX_IMAGE_PIXELS} pixels, over the limit of "
                f"{max_pixels}; downscale it first"
            ) from None
        finally:
            if lift:
                Image.MAX_IMAGE_PIXELS = pil_limit
    return image


def check_image_file(path: str | os.PathLike) -> None:
    """Refuse, from its header alone, an image file that load_image would refuse for its format
    or its size (past PIL's decompression-bomb limit, where opening it only warns): training
    checks every picture so before it starts, without decoding them."""
    with _open_within(path, None, f"image {path}"):
        pass


def is_animation(path: str | os.PathLike) -> bool:
    """Whether an image file holds several frames to play (PIL's is_animated: an animated GIF
    or PNG), from its headers; False for a file load_image would refuse, which it then names."""
    try:
        with _open_within(path, None, f"image {path}") as image:
            return bool(getattr(image, "is_animated", False))
    except (LlavaEdgeError, OSError, SyntaxError, ValueError):
        return False


# Formats PIL reads that are not read here. PIL renders PostScript (EPS) by running Ghostscript
# on it, which an untrusted image must not reach (Ghostscript has a history of exploits); icons
# (ICO, ICNS) and IPTC files wrap another image that PIL decodes under its own pixel limit, not
# the caller's (an ICO even as it opens). No camera makes any of them.
UNREAD_FORMATS = ("EPS", "ICO", "ICNS", "IPTC")
# PIL's MPEG plugin identifies an MPEG-1 video by its header and decodes none of it: a video,
# named as one (see video_format).
VIDEO_PLUGINS = ("MPEG",)


def _readable_formats() -> list[str]:
    """Every format PIL reads (plugins an app registers too, such as pillow-heif's) but
    UNREAD_FORMATS and VIDEO_PLUGINS."""
    Image.init()
    return [name for name in Image.ID if name not in (*UNREAD_FORMATS, *VIDEO_PLUGINS)]


def _refuse_encoded(array: np.ndarray) -> None:
    """An image file's bytes held in a uint8 array, (N, 1) as cv2.imencode gives them or (N,)
    as np.frombuffer does, would pass for a picture one pixel wide: refused, naming the bytes."""
    column = array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)
    if array.dtype != np.uint8 or not column:
        return
    fmt = encoded_format(array[:12].tobytes())
    if fmt is not None:
        raise LlavaEdgeError(
            f"the image array holds an encoded {fmt} file, not pixels; pass its bytes: "
            "array.tobytes()"
        )


def base64_format(text: str) -> str | None:
    """encoded_format of what `text` decodes to, where it is an image's bare base64 (a JPEG's
    begins with /9j/, which reads as a path)."""
    try:
        return encoded_format(base64.b64decode(text[:16], validate=True))
    except (binascii.Error, ValueError):
        return None


def encoded_format(head: bytes) -> str | None:
    """JPEG, PNG, GIF or WEBP, where `head` (a file's first 12 bytes) begins one of them: the
    formats cameras and apps send, told where their bytes come in some other form."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return None


# How many of a file's first bytes video_format reads: an MPEG-TS packet and the next one's sync.
VIDEO_HEAD = 189
# ISO base media files that hold pictures, not video: HEIF and AVIF (pillow-heif reads them).
_PICTURE_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_PICTURE_BRANDS += (b"mif2", b"avif", b"avis")


def video_format(head: bytes) -> str | None:
    """MP4, MOV, MKV/WebM, AVI, MPEG-TS, MPEG or FLV, where `head` (a file's first VIDEO_HEAD
    bytes) begins one of them: a video given where an image goes is named as one. The magic
    numbers are read here: PIL identifies no video container, PyAV is an optional extra, and a
    file-type library (filetype, python-magic) would be a runtime dependency for one message."""
    if head[4:8] == b"ftyp" and head[8:12] not in _PICTURE_BRANDS:
        return "MOV" if head[8:12] == b"qt  " else "MP4"
    if head[4:8] in (b"moov", b"mdat", b"wide"):  # QuickTime without a file type box
        return "MOV"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML
        return "MKV/WebM"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "AVI"
    if len(head) > 188 and head[0] == head[188] == 0x47:  # two packets' sync bytes
        return "MPEG-TS"
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):  # program stream, video
        return "MPEG"
    if head.startswith(b"FLV\x01"):
        return "FLV"
    return None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        # (C, H, W) when its last axis is too long for channels: (3, 32, 2) is no such case
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] > 4
        first = " (channels first? transpose it to (H, W, C))" if channels_first else ""
        raise LlavaEdgeError(
            f"image array has shape {array.shape}{first}; expected (H, W, 3) RGB, "
            "(H, W, 4) RGBA or (H, W) grey"
        )
    if array.size == 0:
        raise LlavaEdgeError("image array is empty")
    if array.dtype.kind not in "biuf":
        raise LlavaEdgeError(
            f"image array holds {array.dtype}, not pixel values; give uint8 pixels 0-255 or "
            "floats in [0, 1]"
        )
    if array.dtype != np.uint8:
        array = _to_uint8(array, f"{array.dtype} image array")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def _to_uint8(array: np.ndarray, form: str) -> np.ndarray:
    """Pixel values as uint8 by the rule of their type (see `load_image`), never by their values.
    form: how the error names what was given."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "b":
        return array.astype(np.uint8) * 255
    if kind == "u" and size == 2:  # either byte order
        return (array >> 8).astype(np.uint8)
    low, high = float(np.min(array)), float(np.max(array))
    if kind == "f":
        if not (low >= 0.0 and high <= 1.0):  # NaN fails both
            raise _unscaled(form, "[0, 1]", low, high)
        return np.round(array * 255).astype(np.uint8)
    if not (low >= 0 and high <= 255):
        raise _unscaled(form, "0-255", low, high)
    return array.astype(np.uint8)


def _unscaled(form: str, scale: str, low: float, high: float) -> LlavaEdgeError:
    return LlavaEdgeError(
        f"{_with_article(form)} must hold values in {scale}, got {low:g} to {high:g}: its scale would be a "
        "guess; give uint8 pixels 0-255, uint16 for 16-bit data, or floats in [0, 1]"
    )


def _with_article(noun: str) -> str:
    """'an int32 image array', 'a uint16 ...', 'a float32 ...': by the sound of the first
    letter of a dtype's name (a 'u' sounds 'you')."""
    return ("an " if noun[:1].lower() in "aeio" else "a ") + noun


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers converts from 5.21: transparency is composited over white (5.20
    and older drop the alpha channel, showing the colours under transparent pixels). Values
    wider than 8 bits follow `load_image`'s rule."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # wider than 8 bits: PIL's convert would clip at 255; the rule arrays follow instead
        array = np.asarray(image)
        if image.mode == "I" and image.format == "PPM":  # a 16-bit PGM, scaled to 0-65535
            array = array.astype(np.uint16)
        image = Image.fromarray(_to_uint8(array, f"PIL image of mode {image.mode}"))
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts it to straight only
        image = image.convert(image.mode.upper())
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """An RGB PIL image -> float32 pixel_values [3, H, W], as the checkpoint's processor computes
    them."""
    check_steps(image.height, image.width, spec)
    array = np.asarray(image, dtype=np.uint8)
    if spec.pad_to_square:
        array = _pad_to_square(array, tuple(int(m * 255) for m in spec.mean))
    if spec.resize:
        height, width = _resize_size(array.shape[0], array.shape[1], spec.resize)
        resample = Image.Resampling(spec.resample)
        array = np.asarray(Image.fromarray(array).resize((width, height), resample=resample))
    if spec.center_crop:
        array = _center_crop(array, spec.height, spec.width)
    if array.shape[:2] != (spec.height, spec.width):
        raise LlavaEdgeError(
            f"preprocessed image is {array.shape[1]}x{array.shape[0]}, the vision encoder "
            f"takes {spec.width}x{spec.height}: the manifest's image settings are inconsistent"
        )
    pixels = (array.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.normalize:
        pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def check_steps(height: int, width: int, spec: ImageSpec) -> None:
    """Refuse an image whose aspect ratio would blow up padding or resizing: the processor pads a
    1x60000 strip to 60000x60000 and resizes a 1x200000 one to 336x67 million pixels, gigabytes
    from a file of a few hundred bytes that the pixel limit lets through."""
    side = max(height, width) if spec.pad_to_square else 0
    steps = [(side, side)] if side else []
    if spec.resize:
        steps.append(_resize_size(side or height, side or width, spec.resize))
    allowed = max(STEP_PIXELS, 2 * height * width)
    for h, w in steps:
        if h * w > allowed:
            raise TooLarge(
                f"image is {width}x{height}: its aspect ratio would make a {w}x{h} image on the "
                "way to the vision encoder's input; crop it closer to a square"
            )


def _pad_to_square(array: np.ndarray, colour: tuple[int, ...]) -> np.ndarray:
    height, width = array.shape[:2]
    if height == width:
        return array
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=array.dtype)
    out[:] = np.asarray(colour, dtype=array.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = array
    return out


def _resize_size(height: int, width: int, resize: dict[str, int]) -> tuple[int, int]:
    """The (height, width) transformers resizes to: the shortest edge to its size, the longest
    kept within longest_edge where the processor sets one (get_size_with_aspect_ratio's
    arithmetic, float for float), or a fixed height and width."""
    if "shortest_edge" not in resize:
        return resize["height"], resize["width"]
    size, cap = resize["shortest_edge"], resize.get("longest_edge")
    short, long = (width, height) if width <= height else (height, width)
    scaled = float(size)
    if cap is not None and long / short * size > cap:
        scaled = cap * float(short) / float(long)
        size = int(round(scaled))
    if short == size:
        return height, width
    new_long = int(scaled * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    in_h, in_w = array.shape[:2]
    if in_h < height or in_w < width:
        # Smaller than the crop: zero-pad around it first, as transformers does.
        new_h, new_w = max(height, in_h), max(width, in_w)
        padded = np.zeros((new_h, new_w, array.shape[2]), dtype=array.dtype)
        top, left = math.ceil((new_h - in_h) / 2), math.ceil((new_w - in_w) / 2)
        padded[top : top + in_h, left : left + in_w] = array
        array, in_h, in_w = padded, new_h, new_w
    top, left = (in_h - height) // 2, (in_w - width) // 2
    return array[top : top + height, left : left + width]
