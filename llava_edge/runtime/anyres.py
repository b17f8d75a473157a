"""AnyRes (LLaVA-NeXT / LLaVA-1.6, the successor of LLaVA-1.5-HD): an image of any size as
several vision-encoder inputs, and their features as one variable-length run of image tokens.

Pixels, as transformers' LlavaNextImageProcessor computes them (tests hold them equal within
1e-5): the resolution of `grid_pinpoints` that keeps most of the image with least waste is chosen,
the image is resized into it keeping its aspect ratio, padded with black to fill it and cut into
tiles the vision encoder's size; a base image (the whole picture squashed to that size) goes first.
All of them run through the vision encoder and projector as one batch.

Features, as LlavaNextModel.pack_image_features arranges them: the base image's, then the tiles'
feature maps joined into one grid, cut back to the image's own aspect ratio (the padding
removed), with `image_newline` closing every row. How many image tokens that is depends on the
image's size, so the prompt gets as many placeholders as there are features.

LLaVA-OneVision (`anyres_max_N`, AnyResSpec.max_patches) packs them the same way, but first
shrinks a cut grid of more than about N tiles' features to about N tiles' by bilinear
interpolation, as LlavaOnevisionModel.pack_image_features does with
`nn.functional.interpolate(mode="bilinear")`. It tiles an image only where it is its prompt's
only one (AnyResSpec.several_images False): each of several is padded to a square with the mean
colour and resized to the vision encoder's input, untiled, as LlavaOnevisionImageProcessor does
where `batch_num_images` is more than one; its features are that one input's, and one
image_newline after them (pack_image_features' single-input branch).

Written in numpy and PIL because the runtime may not import transformers.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import AnyResSpec, ImageSpec, Manifest
from llava_edge.runtime.image import check_steps, preprocess


class ImagePixels:
    """One image ready for the vision encoder. The size travels with the pixels because the
    number of image tokens, and how AnyRes features are unpadded, depend on it.

    On LLaVA-OneVision, which tiles an image only where it is its prompt's one image and reads
    each of several untiled, neither form's pixels are made before a prompt reads them: a camera
    frame asked about with others is never tiled (a 1080p frame's tiles take about 200 ms on a
    CPU core, its untiled input a third of that)."""

    def __init__(
        self,
        pixels: np.ndarray | Callable[[], np.ndarray],
        size: tuple[int, int],
        key: str,
        square: Callable[[], ImagePixels] | None = None,
        untiled: bool = False,
    ):
        self._pixels = pixels  # or what makes them, on first use
        self.size = size  # (width, height) of the image as given
        # names the image's features in this form (the feature cache's, prefix reuse's)
        self.key = key
        # what makes the untiled form a prompt of several images reads the image in
        # (LLaVA-OneVision); None where a prompt of several reads it as one alone, and on the
        # untiled form itself
        self._square = square
        self.untiled = untiled  # this is the untiled form: one input, its features and one newline

    @property
    def pixels(self) -> np.ndarray:
        """[1 + tiles, 3, H, W] float32; [1, 3, H, W] untiled. Made on first use where they were
        not given (two threads asking at once may both make them, the same)."""
        pixels = self._pixels  # read once: another thread may replace it meanwhile
        if callable(pixels):
            pixels = self._pixels = pixels()
        return pixels

    @property
    def has_square(self) -> bool:
        """Whether a prompt of several images reads this image in another, untiled form."""
        return self._square is not None

    def square(self) -> ImagePixels:
        """The untiled form (has_square), made on the first call and kept."""
        square = self._square  # read once: another thread may replace it meanwhile
        if not isinstance(square, ImagePixels):
            square = self._square = square()
        return square


def pixels_list(images: ImagePixels | list[ImagePixels] | None) -> list[ImagePixels]:
    """No image, one, or several, as a list. Anything else is refused: an array's rows read as
    that many images, a path's characters as as many."""
    if images is None:
        return []
    if isinstance(images, ImagePixels):
        return [images]
    if isinstance(images, list | tuple) and all(isinstance(one, ImagePixels) for one in images):
        return list(images)
    raise LlavaEdgeError(
        "this takes images as Pipeline.image_pixels gives them; generate, answer, stream, chat "
        "and BatchEngine.submit take a path, bytes, a PIL image or an array"
    )


def prompt_forms(images: list[ImagePixels]) -> list[ImagePixels]:
    """The images as one prompt of them reads them: each of several in its untiled form where
    the model reads several so (LLaVA-OneVision), else as they are."""
    if len(images) < 2:
        return images
    return [one.square() if one.has_square else one for one in images]


def image_token_count(
    image: ImagePixels, spec: ImageSpec, num_image_tokens: int, several: bool
) -> int:
    """How many image tokens the image takes in a prompt, from its size and form alone, before
    the vision encoder runs. several: the prompt holds other images too."""
    if image.untiled or (several and image.has_square):
        return untiled_feature_count(spec.anyres)
    return feature_count(image.size, spec, num_image_tokens)


def untiled_feature_count(anyres: AnyResSpec) -> int:
    """The image tokens of an untiled image: the base input's features and one newline."""
    return anyres.tile_features**2 + (1 if anyres.newline is not None else 0)


def untiles_several(spec: ImageSpec) -> bool:
    """Whether a prompt of several images reads each untiled (LLaVA-OneVision)."""
    return spec.anyres is not None and not spec.anyres.several_images


def select_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The [height, width] of `pinpoints` that shows most of the image, then wastes least."""
    best, most, least = None, 0, math.inf
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_w * target_h - shown
        if shown > most or (shown == most and wasted < least):
            best, most, least = (target_h, target_w), shown, wasted
    if best is None:
        raise LlavaEdgeError("the manifest's AnyRes grid_pinpoints are empty; re-export the model")
    return best


def max_tiles(anyres: AnyResSpec) -> int:
    """The most vision-encoder inputs one image can take (base image included)."""
    tile = anyres.tile_size
    return 1 + max((h // tile) * (w // tile) for h, w in anyres.grid_pinpoints)


def image_pixels(image: Image.Image, spec: ImageSpec) -> ImagePixels:
    size = f"{image.size[0]}x{image.size[1]}".encode()
    if not untiles_several(spec):
        pixels = pixel_batch(image, spec)
        # the same pixels from an image of the same size (AnyRes unpads by size): hashed once
        digest = hashlib.sha1(pixels.tobytes())
        digest.update(size)
        return ImagePixels(pixels, image.size, digest.hexdigest())
    # LLaVA-OneVision: the picture is hashed, and each form's pixels made when a prompt reads
    # it in that form, from this picture (the caller's own image, copied by Pipeline.image_pixels)
    digest = hashlib.sha1(image.tobytes())
    digest.update(size)
    picture = digest.hexdigest()
    return ImagePixels(
        functools.partial(pixel_batch, image, spec),
        image.size,
        "tiled " + picture,
        functools.partial(_untiled, image, spec, "untiled " + picture),
    )


def _untiled(image: Image.Image, spec: ImageSpec, key: str) -> ImagePixels:
    """The image padded to a square with the mean colour and resized to the vision encoder's
    input, as LlavaOnevisionImageProcessor prepares each of a prompt's several images."""
    return ImagePixels(preprocess(image, _flat(spec))[None], image.size, key, untiled=True)


def _flat(spec: ImageSpec) -> ImageSpec:
    """The preprocessing of an untiled image: padded to a square, no tiles."""
    return ImageSpec(**{**spec.__dict__, "anyres": None, "pad_to_square": True})


def check_several(sizes: list[tuple[int, int]], spec: ImageSpec) -> None:
    """Refuse (TooLarge) images one prompt cannot hold together, from their sizes (width,
    height) alone: on LLaVA-OneVision each of several is padded to a square untiled, which one
    too far from square cannot be (alone, it is tiled and read)."""
    if len(sizes) > 1 and untiles_several(spec):
        flat = _flat(spec)
        for width, height in sizes:
            check_steps(height, width, flat)


def feature_count(size: tuple[int, int], spec: ImageSpec, num_image_tokens: int) -> int:
    """How many image tokens an image of `size` (width, height) becomes, from its size alone,
    so that a prompt can be rendered before the vision encoder runs. num_image_tokens: the
    model's count for a non-AnyRes image."""
    if spec.anyres is None:
        return num_image_tokens
    return anyres_feature_count(size, spec.anyres)


def anyres_feature_count(size: tuple[int, int], anyres: AnyResSpec) -> int:
    """feature_count of an AnyRes image of `size` (width, height)."""
    width, height = size
    target_h, target_w = select_resolution(height, width, anyres.grid_pinpoints)
    side = anyres.tile_features
    rows, cols = target_h // anyres.tile_size * side, target_w // anyres.tile_size * side
    top, bottom, left, right = _unpadded(rows, cols, height, width)
    return side * side + _grid_tokens(bottom - top, right - left, anyres)


def _grid_tokens(rows: int, cols: int, anyres: AnyResSpec) -> int:
    """Image tokens of an unpadded rows x cols feature grid: shrunk where the model shrinks it,
    with a newline closing each row."""
    rows, cols = _shrunk(rows, cols, anyres.tile_features, anyres.max_patches) or (rows, cols)
    return rows * (cols + (1 if anyres.newline is not None else 0))


def _shrunk(rows: int, cols: int, side: int, max_patches: int | None) -> tuple[int, int] | None:
    """The size LLaVA-OneVision shrinks an unpadded rows x cols feature grid to where it holds
    more than about `max_patches` tiles' features (more than 1.1 times as many on a side); None
    where it is kept (always without max_patches)."""
    if max_patches is None:
        return None
    ratio = math.sqrt(rows * cols / (max_patches * side**2))
    if ratio <= 1.1:
        return None
    return int(rows // ratio), int(cols // ratio)


def max_feature_count(manifest: Manifest) -> int:
    """The most image tokens one image can take: an AnyRes grid before unpadding; with
    LLaVA-OneVision's shrinking, the most any grid the unpadding can cut gives once shrunk (a
    grid cut narrower can shrink to more rows, each with its newline)."""
    anyres = manifest.image.anyres
    if anyres is None:
        return manifest.num_image_tokens
    side, tile = anyres.tile_features, anyres.tile_size
    grids = [(h // tile * side, w // tile * side) for h, w in anyres.grid_pinpoints]
    if anyres.max_patches is None:
        return side * side + max(_grid_tokens(rows, cols, anyres) for rows, cols in grids)
    newline = anyres.newline is not None
    return side * side + _most_shrunk_tokens(tuple(grids), side, anyres.max_patches, newline)


@functools.lru_cache(maxsize=16)
def _most_shrunk_tokens(
    grids: tuple[tuple[int, int], ...], side: int, max_patches: int, newline: bool
) -> int:
    """The most tokens any cut of these grids gives once shrunk: unpadding keeps every row and
    fewer columns, or every column and fewer rows."""
    anyres = AnyResSpec([], 0, [], side, "newline" if newline else None, max_patches)
    cuts = {(rows, c) for rows, cols in grids for c in range(cols + 1)}
    cuts |= {(r, cols) for rows, cols in grids for r in range(rows + 1)}
    return max(_grid_tokens(rows, cols, anyres) for rows, cols in cuts)


def min_feature_count(manifest: Manifest) -> int:
    """The fewest image tokens one image can take: with AnyRes, the base image's alone (a very
    wide or tall image's grid unpads to no rows)."""
    anyres = manifest.image.anyres
    if anyres is None:
        return manifest.num_image_tokens
    return anyres.tile_features * anyres.tile_features


def each_image_tokens(manifest: Manifest, count: int, smallest: bool = False) -> int:
    """The most image tokens (smallest: the fewest) each of `count` images of one prompt can
    take: with LLaVA-OneVision, each of several takes its untiled form's, whatever its size."""
    if count > 1 and untiles_several(manifest.image):
        return untiled_feature_count(manifest.image.anyres)
    return (min_feature_count if smallest else max_feature_count)(manifest)


def pixel_batch(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """pixel_values for one image: [1, 3, H, W], or with AnyRes [1 + tiles, 3, H, W]."""
    if spec.anyres is None:
        return preprocess(image, spec)[None]
    anyres = spec.anyres
    width, height = image.size
    target_h, target_w = select_resolution(height, width, anyres.grid_pinpoints)
    fitted = _fit(image, target_h, target_w, spec.resample)
    tile = anyres.tile_size
    tiles = [
        fitted[top : top + tile, left : left + tile]
        for top in range(0, target_h, tile)
        for left in range(0, target_w, tile)
    ]
    base_h, base_w = anyres.base_size
    base = np.asarray(image.resize((base_w, base_h), resample=Image.Resampling(spec.resample)))
    flat = ImageSpec(**{**spec.__dict__, "anyres": None, "pad_to_square": False})
    return np.stack([preprocess(Image.fromarray(p), flat) for p in [base, *tiles]])


def _fit(image: Image.Image, target_h: int, target_w: int, resample: int) -> np.ndarray:
    """Resize into target_h x target_w keeping the aspect ratio, centred on black padding."""
    scale_w, scale_h = target_w / image.width, target_h / image.height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(image.height * scale_w), target_h)
    else:
        new_h, new_w = target_h, min(math.ceil(image.width * scale_h), target_w)
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling(resample)))
    out = np.zeros((target_h, target_w, 3), dtype=np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def image_embeds(
    embeds: np.ndarray, size: tuple[int, int], spec: ImageSpec, newline: np.ndarray | None
) -> np.ndarray:
    """Projected features of one image's batch [B, N, hidden] -> its image tokens [T, hidden].

    size: the image's (width, height), as PIL gives it. Without AnyRes, B is 1 and T is N.
    """
    if spec.anyres is None:
        return embeds[0]
    anyres = spec.anyres
    width, height = size
    target_h, target_w = select_resolution(height, width, anyres.grid_pinpoints)
    rows, cols = target_h // anyres.tile_size, target_w // anyres.tile_size
    side = anyres.tile_features
    if embeds.shape[0] != 1 + rows * cols or embeds.shape[1] != side * side:
        raise LlavaEdgeError(
            f"the vision encoder gave {embeds.shape[0]} x {embeds.shape[1]} features for an "
            f"AnyRes grid of {rows} x {cols} tiles of {side} x {side}: the manifest does not "
            "match the graphs; re-export the model"
        )
    hidden = embeds.shape[2]
    grid = embeds[1:].reshape(rows, cols, side, side, hidden)
    grid = grid.transpose(4, 0, 2, 1, 3).reshape(hidden, rows * side, cols * side)
    grid = _unpad(grid, height, width)
    shrunk = _shrunk(grid.shape[1], grid.shape[2], side, anyres.max_patches)
    if shrunk is not None:
        grid = bilinear(grid, *shrunk)
    if newline is not None:
        column = np.broadcast_to(
            newline.astype(grid.dtype)[:, None, None], (hidden, grid.shape[1], 1)
        )
        grid = np.concatenate([grid, column], axis=2)
    return np.concatenate([embeds[0], grid.reshape(hidden, -1).T])


def untiled_embeds(embeds: np.ndarray, newline: np.ndarray | None) -> np.ndarray:
    """Projected features of an untiled image [1, N, hidden] -> its image tokens: its N
    features, then image_newline where the model has one."""
    if embeds.shape[0] != 1:
        raise LlavaEdgeError(
            f"the vision encoder gave {embeds.shape[0]} feature sets for one untiled image: the "
            "graphs do not match the runtime; re-export the model"
        )
    if newline is None:
        return embeds[0]
    return np.concatenate([embeds[0], newline.astype(embeds.dtype)[None]])


def bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """grid [C, H, W] resized to [C, height, width] as torch.nn.functional.interpolate(grid[None],
    [height, width], mode="bilinear")[0] computes it (align_corners False, no antialiasing), in
    float32: each output cell blends the four input cells around its centre's source position."""
    source = grid.astype(np.float32, copy=False)
    rows, row_weight = _linear_taps(source.shape[1], height)
    cols, col_weight = _linear_taps(source.shape[2], width)
    top, bottom = source[:, rows[0]], source[:, rows[1]]
    upper = top[:, :, cols[0]] * col_weight[0] + top[:, :, cols[1]] * col_weight[1]
    lower = bottom[:, :, cols[0]] * col_weight[0] + bottom[:, :, cols[1]] * col_weight[1]
    out = upper * row_weight[0][:, None] + lower * row_weight[1][:, None]
    return out.astype(grid.dtype, copy=False)


def _linear_taps(size: int, out: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple]:
    """The two input indices and their weights for each of `out` outputs along an axis of
    `size`, as PyTorch's CPU kernel takes them (float32 arithmetic, half-pixel centres, the
    source clamped at 0 and the second tap at the last index)."""
    scale = np.float32(size) / np.float32(out)
    source = np.maximum(
        scale * (np.arange(out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
        np.float32(0),
    )
    first = np.minimum(np.floor(source).astype(np.int64), size - 1)
    second = np.minimum(first + 1, size - 1)
    weight = np.clip(source - first.astype(np.float32), 0, 1).astype(np.float32)
    return (first, second), (np.float32(1) - weight, weight)


def _unpad(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Cut the feature grid [hidden, H', W'] back to the image's aspect ratio (the padding off)."""
    top, bottom, left, right = _unpadded(grid.shape[1], grid.shape[2], height, width)
    return grid[:, top:bottom, left:right]


def _unpadded(current_h: int, current_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The (top, bottom, left, right) bounds of a current_h x current_w feature grid that hold
    an image of height x width, as LlavaNextModel's unpad_image cuts them."""
    if width / height > current_w / current_h:
        new_h = int(round(height * (current_w / width), 7))
        pad = (current_h - new_h) // 2
        return pad, current_h - pad, 0, current_w
    new_w = int(round(width * (current_h / height), 7))
    pad = (current_w - new_w) // 2
    return 0, current_h, pad, current_w - pad


def load_newline(model_dir: Path, manifest: Manifest) -> np.ndarray | None:
    """The image_newline vector of an AnyRes model dir ([hidden]), None without one."""
    anyres = manifest.image.anyres
    if anyres is None or anyres.newline is None:
        return None
    try:
        newline = np.load(model_dir / anyres.newline, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LlavaEdgeError(f"cannot read {model_dir / anyres.newline}: {e}") from None
    if newline.shape != (manifest.text.hidden_size,):
        raise LlavaEdgeError(
            f"{model_dir / anyres.newline} is {list(newline.shape)}, not [{manifest.text.hidden_size}]:"
            " it comes from another model; re-export the model dir"
        )
    return newline
