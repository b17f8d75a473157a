"""Image loading and preprocessing equal transformers' CLIP/LLaVA image processors within 1e-5,
for every kind of image a robot app may hold."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from conftest import write_pgm16
from PIL import Image

from llava_edge.errors import LlavaEdgeError, TooLarge
from llava_edge.manifest import ImageSpec
from llava_edge.runtime.image import load_image, preprocess

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def spec(size: int = 56, pad: bool = False) -> ImageSpec:
    return ImageSpec(
        height=size,
        width=size,
        resize={"shortest_edge": size},
        resample=3,
        center_crop=True,
        rescale_factor=1 / 255,
        normalize=True,
        mean=MEAN,
        std=STD,
        pad_to_square=pad,
    )


def hf_processor(size: int = 56, pad: bool = False):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=MEAN,
        image_std=STD,
        do_pad=pad,
    )


def reference(image, size: int = 56, pad: bool = False) -> np.ndarray:
    image = as_transformers_reads(image)
    return np.asarray(hf_processor(size, pad)(images=image, return_tensors="np")["pixel_values"][0])


def as_transformers_reads(image):
    """The picture transformers preprocesses. From 5.21 its convert_to_rgb composites
    transparency over white, which the runtime does; 5.20 and older drop the alpha channel (the
    colours under transparent pixels show), so for them it is composited here first, as 5.21 does,
    and the rest of their preprocessing is still held to."""
    import transformers

    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if not isinstance(image, Image.Image) or version >= (5, 21):
        return image
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def photo(mode: str, h: int = 45, w: int = 70) -> Image.Image:
    base = Image.fromarray(noise(h, w))
    if mode == "RGBA":
        rgba = np.dstack([noise(h, w), np.linspace(0, 255, w, dtype=np.uint8)[None].repeat(h, 0)])
        return Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return base.quantize(64)
    if mode == "P_transparent":
        image = base.quantize(64)
        image.info["transparency"] = 3
        return image
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P_transparent", "CMYK", "I", "1"])
def test_modes_match_transformers(mode):
    image = photo(mode)
    assert np.abs(preprocess(load_image(image), spec()) - reference(image)).max() < 1e-5


@pytest.mark.parametrize("size", [(45, 70), (70, 45), (20, 30), (56, 56), (301, 97)])
@pytest.mark.parametrize("pad", [False, True])
def test_geometry_and_pad_to_square_match_transformers(size, pad):
    image = Image.fromarray(noise(*size, seed=size[0]))
    ours = preprocess(load_image(image), spec(pad=pad))
    assert ours.shape == (3, 56, 56) and ours.dtype == np.float32
    assert np.abs(ours - reference(image, pad=pad)).max() < 1e-5


def test_camera_arrays_match_transformers():
    frame = noise(48, 64)
    assert np.abs(preprocess(load_image(frame), spec()) - reference(frame)).max() < 1e-5
    grey = frame[..., 0]
    assert (
        np.abs(preprocess(load_image(grey), spec()) - reference(Image.fromarray(grey))).max() < 1e-5
    )
    bgra_like = np.dstack([frame, np.full(frame.shape[:2], 255, np.uint8)])
    assert np.abs(preprocess(load_image(bgra_like), spec()) - reference(frame)).max() < 1e-5


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(noise(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (40, 60)  # width and height swapped by the EXIF orientation
    from PIL import ImageOps

    expected = reference(ImageOps.exif_transpose(Image.open(path)))
    assert np.abs(preprocess(loaded, spec()) - expected).max() < 1e-5


def test_a_photo_whose_exif_pil_cannot_write_back_is_turned_upright():
    """A camera's tag of another type than the standard's (here XResolution as text) reads, but
    PIL's exif_transpose fails writing it back: the picture is turned all the same."""
    image = Image.fromarray(noise(20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    exif[0x0110] = "Model X"  # Model, text
    file = io.BytesIO()
    image.save(file, format="JPEG", exif=exif, quality=95)
    clean = file.getvalue()
    model_tag = b"\x01\x10\x00\x02"  # Model (0x0110), ASCII, as a big-endian IFD entry
    assert clean.count(model_tag) == 1
    broken = clean.replace(model_tag, b"\x01\x1a\x00\x02")  # XResolution (rational), ASCII
    assert Image.open(io.BytesIO(broken)).getexif()[0x011A] == "Model X"
    upright = load_image(broken)
    assert upright.size == (20, 30)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(load_image(clean)))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_a_photo_whose_exif_header_is_unreadable_is_read_as_stored(fmt):
    """EXIF whose header is no TIFF header gives no orientation: PIL reads a JPEG's so (and
    transformers with it), a WebP's it raises on, though the picture decodes."""
    image = Image.fromarray(noise(20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    file = io.BytesIO()
    image.save(file, format=fmt, exif=exif, lossless=True, quality=95)
    assert file.getvalue().count(b"MM\x00*") == 1
    broken = file.getvalue().replace(b"MM\x00*", b"MX\x00*")
    stored = Image.open(io.BytesIO(broken)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(load_image(broken)), np.asarray(stored))


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
    """16-bit grey (depth cameras, machine vision) is scaled to 8 bits, not clipped to white."""
    wide = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    eight_bit = Image.fromarray((wide >> 8).astype(np.uint8))
    # a 16-bit PGM or a camera's raw buffer read with numpy holds big-endian values ('>u2')
    for source in (path, wide, wide.astype(">u2")):
        ours = preprocess(load_image(source), spec())
        assert np.abs(ours - reference(eight_bit)).max() < 1e-5


def test_an_image_read_from_a_pipe(tmp_path):
    """`... | llava-edge run --image /dev/stdin`, a named pipe from a camera process: a pipe's size
    is 0, and it was refused as "an empty file"."""
    import os
    import threading

    fifo = tmp_path / "camera"
    os.mkfifo(fifo)
    data = _png_bytes()
    writer = threading.Thread(target=lambda: fifo.write_bytes(data))
    writer.start()
    try:
        loaded = load_image(fifo)
    finally:  # a reader lets a writer that was never read finish; opened so, it never blocks
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(10)
        os.close(reader)
    assert np.array_equal(np.asarray(loaded), np.asarray(load_image(data)))


def test_a_pipe_waiting_for_its_writer_holds_up_no_other_thread(tmp_path):
    """A named pipe's open blocks until a camera process writes to it; while it waited, it held
    the lock every image file takes to be opened, and other threads' images waited with it."""
    import os
    import threading

    fifo = tmp_path / "camera"
    os.mkfifo(fifo)
    waiting = threading.Thread(target=load_image, args=(fifo,), daemon=True)
    waiting.start()
    try:
        other: list = []
        reader = threading.Thread(target=lambda: other.append(load_image(_png_bytes())))
        reader.start()
        reader.join(5)
        assert other, "an image in memory waited on the pipe"
    finally:
        fifo.write_bytes(_png_bytes())  # the waiting load reads it and ends
        waiting.join(10)


def test_images_opened_on_several_threads_leave_the_warning_filters_as_they_were(
    tmp_path, monkeypatch
):
    """Opening turns PIL's DecompressionBombWarning into an error through the process's warning
    filters; two threads doing it at once left that filter installed for the whole app."""
    import contextlib
    import threading
    import warnings

    path = tmp_path / "frame.png"
    Image.fromarray(noise(20, 20)).save(path)
    real_open, met, first_done = Image.open, threading.Barrier(2, timeout=0.5), threading.Event()

    def opening(*args, **kwargs):  # both threads inside the open at once, the first out first
        # opens one at a time: the other never comes, and the wait breaks
        with contextlib.suppress(threading.BrokenBarrierError):
            met.wait()
        if threading.current_thread().name == "second":
            first_done.wait(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", opening)
    before = list(warnings.filters)
    first = threading.Thread(target=lambda: (load_image(path), first_done.set()), name="first")
    second = threading.Thread(target=lambda: load_image(path), name="second")
    first.start(), second.start()
    first.join(10), second.join(10)
    assert warnings.filters == before


def test_encoded_bytes_and_first_frame_of_animation(tmp_path):
    frames = [Image.fromarray(noise(30, 30, seed=i)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    gif = buffer.getvalue()
    first = Image.open(io.BytesIO(gif)).convert("RGB")
    assert np.abs(preprocess(load_image(gif), spec()) - reference(first)).max() < 1e-5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not an image at all"), "not an image"),
        (lambda p: p.write_bytes(_png_bytes()[:60]), "corrupt or truncated"),
    ],
)
def test_bad_image_files_get_clear_errors(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(LlavaEdgeError, match=message):
        load_image(path)


def test_missing_file_and_pixel_limits(tmp_path, monkeypatch):
    with pytest.raises(LlavaEdgeError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")
    path = tmp_path / "big.png"
    Image.fromarray(noise(64, 64)).save(path)
    with pytest.raises(LlavaEdgeError, match="over the limit"):
        load_image(path, max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(LlavaEdgeError, match="PIL's decompression-bomb limit"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_a_pixel_limit_over_pils_lets_an_image_decode(tmp_path, monkeypatch, fmt):
    """PIL checks its own limit again as GIF frames and TIFF tiles decode: a larger limit of
    ours still lets such an image through, and one far past both is refused with ours."""
    path = tmp_path / f"big.{fmt.lower()}"
    frames = [Image.fromarray(noise(64, 64, seed=i)) for i in range(2)]
    frames[0].save(path, save_all=True, append_images=frames[1:], tile=(16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(path, max_pixels=5000).size == (64, 64)
    with pytest.raises(TooLarge, match="over the limit of 1500"):
        load_image(path, max_pixels=1500)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_bad_arrays_get_clear_errors():
    with pytest.raises(LlavaEdgeError, match="shape"):
        load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(LlavaEdgeError, match=r"channels first\? transpose it to \(H, W, C\)"):
        load_image(np.zeros((3, 32, 48), np.uint8))
    with pytest.raises(LlavaEdgeError, match=r"has shape \(3, 32, 2\); expected") as grey_alpha:
        load_image(np.zeros((3, 32, 2), np.uint8))  # grey and alpha: channels last already
    assert "channels first" not in str(grey_alpha.value)
    with pytest.raises(LlavaEdgeError, match="shape") as flat:
        load_image(np.zeros(3, np.uint8))
    assert "channels first" not in str(flat.value)
    import torch

    with pytest.raises(LlavaEdgeError, match="got Tensor; convert it to a channels-last numpy"):
        load_image(torch.zeros(3, 32, 48))
    with pytest.raises(LlavaEdgeError, match="empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- SigLIP (llava-interleave, LLaVA-OneVision): a square resize, no crop, mean and std 0.5 ----


def siglip_processor(size: int = 384):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def siglip_spec(size: int = 384) -> ImageSpec:
    """The spec export writes for this processor, read by export's own code."""
    from types import SimpleNamespace

    from llava_edge.export.exporter import _image_spec

    config = SimpleNamespace(
        model_type="llava",
        vision_config=SimpleNamespace(image_size=size, patch_size=14),
    )
    return _image_spec(siglip_processor(size), config)


def test_siglip_spec_is_a_square_resize_without_crop():
    image = siglip_spec()
    assert (image.height, image.width, image.resize) == (384, 384, {"height": 384, "width": 384})
    assert not image.center_crop and not image.pad_to_square
    assert image.mean == image.std == [0.5] * 3 and image.resample == 3


@pytest.mark.parametrize("size", [(45, 70), (70, 45), (20, 30), (384, 384), (480, 640), (301, 97)])
def test_siglip_geometry_matches_transformers(size):
    image = Image.fromarray(noise(*size, seed=size[1]))
    ours = preprocess(load_image(image), siglip_spec())
    theirs = np.asarray(siglip_processor()(images=image, return_tensors="np")["pixel_values"][0])
    assert ours.shape == theirs.shape == (3, 384, 384) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_siglip_modes_match_transformers(mode):
    image = photo(mode)
    theirs = siglip_processor(56)(images=as_transformers_reads(image), return_tensors="np")
    theirs = theirs["pixel_values"][0]
    assert np.abs(preprocess(load_image(image), siglip_spec(56)) - theirs).max() < 1e-5


# ---- inputs a user's camera or app may hand over ---------------------------------------------


def test_a_lazily_opened_image_that_fails_to_decode_is_one_error(tmp_path):
    """Image.open decodes at first use: a truncated file given as a PIL image fails inside
    load_image with LlavaEdgeError, as it does given as a path."""
    path = tmp_path / "cut.png"
    path.write_bytes(_png_bytes()[:300])
    with pytest.raises(LlavaEdgeError, match="cannot decode image"):
        load_image(Image.open(path))
    closed = Image.open(io.BytesIO(_png_bytes()))
    closed.close()
    with pytest.raises(LlavaEdgeError, match="cannot decode image"):
        load_image(closed)


def test_a_pil_image_whose_file_closed_before_it_was_read_is_named_as_such(tmp_path):
    """`with Image.open(path) as image:` closes the file at the block's end: an image given
    after it, not yet decoded, raised a bare AssertionError from PIL."""
    path = tmp_path / "photo.png"
    Image.fromarray(noise(20, 30)).save(path)
    with Image.open(path) as image:
        pass
    with pytest.raises(LlavaEdgeError, match="file was closed before the image was read"):
        load_image(image)
    with Image.open(path) as image:
        image.load()
    assert np.array_equal(np.asarray(load_image(image)), noise(20, 30))


@pytest.mark.parametrize(
    "url, hint",
    [
        ("https://example.com/cat.jpg", "download it"),
        ("data:image/png;base64," + "A" * 1_000_000, r"base64\.b64decode"),
    ],
    ids=["http", "data"],
)
def test_a_url_is_named_as_one_not_as_a_missing_file(url, hint):
    """transformers' load_image fetches URLs and decodes data: URIs; the runtime reads no
    network, and said such a string 'does not exist', quoting all of a megabyte data: URI."""
    with pytest.raises(LlavaEdgeError, match=f"not an image file.*{hint}") as error:
        load_image(url)
    assert len(str(error.value)) < 300
    with pytest.raises(LlavaEdgeError, match="does not exist") as error:
        load_image(url.partition(",")[2])  # the base64 alone, as HF's load_image also takes
    assert len(str(error.value)) < 300


def test_a_file_url_is_named_as_one_with_the_path_it_names(tmp_path):
    """serve and watch take file:// URLs; an image elsewhere is a path, and such a URL to a file
    that exists was said not to exist."""
    path = tmp_path / "a photo.png"
    Image.fromarray(noise(8, 8)).save(path)
    url = path.as_uri()  # file:///.../a%20photo.png
    with pytest.raises(LlavaEdgeError, match="is a file:// URL, not a path") as error:
        load_image(url)
    assert str(error.value).endswith(f"pass the path it names: {path}")
    assert load_image(str(path)).size == (8, 8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_images_base64_given_for_a_path_is_named_as_such(fmt):
    """transformers' load_image takes a bare base64 string; the runtime said 'image /9j/4AAQ...
    does not exist'."""
    import base64

    buffer = io.BytesIO()
    Image.fromarray(noise(20, 30)).save(buffer, fmt)
    text = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(LlavaEdgeError, match=rf"base64 of a {fmt} image.*b64decode") as error:
        load_image(text)
    assert len(str(error.value)) < 300
    assert load_image(base64.b64decode(text)).size == (30, 20)


@pytest.mark.parametrize(
    "head, said",
    [
        (b"\x00\x00\x00\x18ftypmp42", "is a video (MP4)"),
        (b"\x1a\x45\xdf\xa3\x9fB\x86\x81", "is a video (MKV/WebM)"),
        (b"\x00\x00\x01\xb3\x04\x000\x13", "is a video (MPEG)"),  # PIL identifies it, decodes none
        (b"\x00\x00\x00\x18ftypheic", "not an image PIL can read"),  # a HEIF picture
    ],
    ids=["mp4", "mkv", "mpeg-1", "heic"],
)
def test_a_videos_bytes_are_named_as_a_video(head, said):
    """A video's bytes (`cat clip.mp4 | llava-edge run --image -`) are a video, not an image PIL
    cannot read; an MPEG-1 stream, which PIL's MPEG plugin takes for a picture it cannot load,
    was 'corrupt or truncated'."""
    with pytest.raises(LlavaEdgeError, match=re.escape(said)):
        load_image(head + bytes(200))


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(LlavaEdgeError, match="is a directory, not an image file"):
        load_image(tmp_path)


def test_a_device_is_named_as_one_and_never_read():
    """`--image /dev/video0` read the camera's device (a read that may block for ever) and
    called what came back not an image."""
    with pytest.raises(LlavaEdgeError, match=r"/dev/null is a device, not an image file.*watch"):
        load_image("/dev/null")


def test_an_rgb_png_with_a_transparent_colour_is_composited_as_transformers_does(tmp_path):
    pixels = noise(40, 50)
    pixels[:10, :10] = (10, 20, 30)
    path = tmp_path / "trns.png"
    Image.fromarray(pixels).save(path, transparency=(10, 20, 30))
    image = Image.open(path)
    assert image.mode == "RGB" and image.info.get("transparency") == (10, 20, 30)
    ours = preprocess(load_image(path), spec())
    assert np.abs(ours - reference(Image.open(path))).max() < 1e-5
    white = preprocess(load_image(Image.fromarray(np.full((40, 50, 3), 255, np.uint8))), spec())
    assert np.abs(ours[:, :5, :5] - white[:, :5, :5]).max() < 1e-5  # the keyed corner is white


@pytest.mark.parametrize("mode", ["RGBa", "La"])
def test_premultiplied_alpha_is_composited_as_its_straight_form(mode):
    """PIL's premultiplied modes (RGBa, La) hold the pictures RGBA and LA do: composited over
    white as transformers composites those."""
    straight = Image.fromarray(noise(40, 50, channels=4)).convert(mode.upper())
    premultiplied = straight.convert(mode)
    ours = preprocess(load_image(premultiplied), spec())
    assert np.abs(ours - reference(premultiplied.convert(mode.upper()))).max() < 1e-5


@pytest.mark.parametrize(
    "array, message",
    [
        (
            np.full((8, 8, 3), 0.5, np.float32) + np.eye(8, dtype=np.float32)[..., None] * 0.6,
            "[0, 1]",
        ),
        (np.where(np.eye(8)[..., None] > 0, np.nan, 0.5).repeat(3, -1), "[0, 1]"),
        (np.full((8, 8, 3), 200.0), "[0, 1]"),
        (np.ones((8, 8, 3), np.complex64), "not pixel values"),
        (np.full((8, 8, 3), "a"), "not pixel values"),
    ],
    ids=["above_one", "nan", "zero_to_255", "complex", "strings"],
)
def test_arrays_whose_scale_would_be_a_guess_are_refused(array, message):
    """A float frame's scale is not guessed from its values: one pixel at 1.0001 turned a [0, 1]
    frame black, and a dark 0-255 frame came out 255 times brighter."""
    with pytest.raises(LlavaEdgeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_image(array)


def test_float_arrays_in_zero_to_one_are_pixels_over_255():
    frame = noise(30, 40)
    ours = preprocess(load_image(frame.astype(np.float32) / 255), spec())
    assert np.abs(ours - preprocess(load_image(frame), spec())).max() < 1e-5


@pytest.mark.parametrize("pad", [False, True])
def test_an_extreme_aspect_ratio_is_refused_before_it_is_blown_up(pad):
    """A 1x200000 strip passes the pixel limit (200,000 pixels) but resizing it to a 56-pixel
    shortest edge makes 56 x 11 million pixels, and padding it to a square 40 billion."""
    from llava_edge.errors import TooLarge

    strip = load_image(np.zeros((1, 200_000, 3), np.uint8))
    with pytest.raises(TooLarge, match="aspect ratio"):
        preprocess(strip, spec(pad=pad))
    wide = Image.fromarray(noise(20, 400))  # 20:1 still works, as transformers computes it
    assert np.abs(preprocess(wide, spec(pad=pad)) - reference(wide, pad=pad)).max() < 1e-5


# ---- one rule for pixel values, whatever form they come in -----------------------------------


def _ramp(dtype, high: float, h: int = 30, w: int = 40) -> np.ndarray:
    return np.linspace(0, high, h * w).reshape(h, w).astype(dtype)


@pytest.mark.parametrize(
    "array",
    [
        _ramp(np.float32, 1.0),
        _ramp(np.int32, 255),
        _ramp(np.int16, 255),
        _ramp(np.uint16, 65535),
        _ramp(">u2", 65535),
        _ramp(np.float32, 1.0) > 0.5,
    ],
    ids=["float_0_1", "int32_0_255", "int16_0_255", "uint16", "uint16_big_endian", "bool"],
)
def test_the_same_pixels_as_a_pil_image_or_an_array_give_the_same_image(array):
    """Image.fromarray makes the PIL image (modes F, I, I;16, I;16B, 1) of the same values."""
    pil = Image.fromarray(array)
    assert np.array_equal(np.asarray(load_image(pil)), np.asarray(load_image(array)))


@pytest.mark.parametrize(
    "array, form",
    [
        (_ramp(np.float32, 1.0) * 1.5, "a float32"),
        (_ramp(np.float32, 255.0), "a float32"),
        (_ramp(np.int32, 4095), "an int32"),
        (_ramp(np.int32, 255) - 10, "an int32"),
        (_ramp(np.int64, 255) - 10, "an int64"),
    ],
    ids=["float_above_one", "float_0_255", "int32_12_bit", "int32_negative", "int64_negative"],
)
def test_values_whose_scale_would_be_a_guess_are_refused_as_a_pil_image_and_as_an_array(
    array, form
):
    """A 32-bit float (mode F) or integer (mode I) image's scale was read off its values (one
    bright pixel turned a [0, 1] image black), while the same values as an array were refused
    or clipped to white. The message names each with its article ('a int32' read wrong)."""
    pil = Image.fromarray(array.astype(np.int32) if array.dtype == np.int64 else array)
    pil_named = f"a PIL image of mode {pil.mode}"
    for source, named in ((array, f"{form} image array"), (pil, pil_named)):
        with pytest.raises(LlavaEdgeError) as error:
            load_image(source)
        message = str(error.value)
        assert named in message and "\n" not in message
        assert "uint8" in message and "[0, 1]" in message  # what to give instead


def test_a_sixteen_bit_pgm_is_read_as_sixteen_bits(tmp_path):
    """PIL opens a 16-bit PGM (what depth and machine-vision cameras save) as 32-bit mode I,
    its values scaled to 0-65535 (a maxval of 4095 too): the same image as its uint16 array."""
    wide = _ramp(np.uint16, 65535)
    path = tmp_path / "depth.pgm"
    write_pgm16(path, wide)
    assert Image.open(path).mode == "I"
    expected = np.asarray(load_image(wide))
    assert np.array_equal(np.asarray(load_image(path)), expected)
    assert np.array_equal(np.asarray(load_image(Image.open(path))), expected)
    twelve_bit = b"P5 40 30 4095\n" + (wide >> 4).astype(">u2").tobytes()
    assert np.array_equal(
        np.asarray(load_image(twelve_bit)), np.asarray(load_image(wide >> 4 << 4))
    )


def test_views_read_only_and_one_channel_arrays_are_the_pixels_they_show():
    frame = noise(30, 40)
    bgr = np.ascontiguousarray(frame[..., ::-1])
    assert np.array_equal(np.asarray(load_image(bgr[..., ::-1])), frame)  # a strided view
    frozen = frame.copy()
    frozen.setflags(write=False)
    assert np.array_equal(np.asarray(load_image(frozen)), frame)
    grey = frame[..., :1]
    assert np.array_equal(np.asarray(load_image(grey)), np.asarray(load_image(grey[..., 0])))
    wide = _ramp(np.uint16, 65535, 30, 80)[:, ::2]
    assert np.array_equal(np.asarray(load_image(wide)), np.asarray(load_image(wide.copy())))


def test_postscript_is_refused_without_running_ghostscript(monkeypatch):
    """PIL renders EPS by running Ghostscript on it, a program with a history of exploits: an
    image sent to the server is untrusted, and no camera makes PostScript."""
    from PIL import EpsImagePlugin

    buffer = io.BytesIO()
    Image.fromarray(noise(10, 10)).save(buffer, "EPS")
    ran = []

    def ghostscript(tile, size, fp, *args, **kwargs):
        ran.append(size)
        return Image.new("RGB", size).im

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    with pytest.raises(LlavaEdgeError, match="not an image PIL can read"):
        load_image(buffer.getvalue())
    assert ran == []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_an_encoded_file_held_in_an_array_is_refused_naming_its_bytes(fmt):
    """cv2.imencode gives an encoded frame as an (N, 1) uint8 array, np.frombuffer of a ROS
    CompressedImage as (N,): the first was read as a picture one pixel wide and N tall."""
    buffer = io.BytesIO()
    Image.fromarray(noise(40, 30)).save(buffer, fmt)
    encoded = np.frombuffer(buffer.getvalue(), np.uint8)
    for array in (encoded.reshape(-1, 1), encoded):
        with pytest.raises(LlavaEdgeError, match=rf"encoded {fmt} file.*array\.tobytes\(\)"):
            load_image(array)


def test_an_unreadable_file_is_named_as_one_not_as_corrupt(tmp_path, monkeypatch):
    """(The tests may run as root, for whom chmod takes nothing away: the open is refused as it
    is for a file of another user's.)"""
    import builtins
    import errno
    import os

    path = tmp_path / "locked.png"
    path.write_bytes(_png_bytes())
    real_open = builtins.open

    def refusing(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    with pytest.raises(LlavaEdgeError) as error:
        load_image(path)
    assert str(error.value) == f"no permission to read image {path}"


def test_an_icon_wrapping_a_huge_png_is_refused_before_it_is_decoded(monkeypatch):
    """An ICO decodes the PNG inside it as PIL opens it, under PIL's own pixel limit (89M, past
    which it only warns) and not the caller's: a 100 KB icon declaring 16x16 decoded 6000x6000
    pixels before the limit of 1000 refused it."""
    import struct

    from PIL import IcoImagePlugin

    png = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(png, "PNG")
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png.getvalue()), 22)
    icon = struct.pack("<HHH", 0, 1, 1) + entry + png.getvalue()
    decoded = []
    real_frame = IcoImagePlugin.IcoFile.frame
    monkeypatch.setattr(
        IcoImagePlugin.IcoFile, "frame", lambda self, i: decoded.append(i) or real_frame(self, i)
    )
    with pytest.raises(LlavaEdgeError, match="ICO"):
        load_image(icon, max_pixels=1000)
    assert decoded == []


@pytest.mark.parametrize(
    "size", [(45, 70), (70, 45), (40, 100), (100, 40), (1, 60), (56, 56), (30, 200)]
)
def test_a_longest_edge_caps_the_resize_as_transformers_does(size):
    """A processor's size of {shortest_edge, longest_edge} keeps the longer edge within its
    cap (the shorter edge below shortest_edge then, the center crop padding it)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    capped = {"shortest_edge": 56, "longest_edge": 84}
    processor = LlavaImageProcessorPil(
        size=capped, crop_size={"height": 56, "width": 56}, image_mean=MEAN, image_std=STD
    )
    image = Image.fromarray(noise(*size, seed=size[1]))
    theirs = np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0])
    ours = preprocess(load_image(image), ImageSpec(**{**spec().__dict__, "resize": capped}))
    assert np.abs(ours - theirs).max() < 1e-5
