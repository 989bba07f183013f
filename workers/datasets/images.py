"""Normalisation of images to uint8 HWC RGB.

Every dataset source hands its pixels to this module, so one set of rules decides how a
value becomes a uint8 RGB pixel, whatever the file format or array dtype:

- uint8 values are kept as they are.
- uint16 values (and Pillow's 16-bit modes) are scaled by 255/65535 and rounded.
- Other integer dtypes must hold 8-bit values (0..255); cast 16-bit data to uint16 first.
- Float values must lie in [0, 1] (1e-6 either side is tolerated and clipped) and become
  ``round(x * 255)``, so ``u8 / 255`` gives back exactly ``u8``. NaN and infinity are rejected.
- One channel (or no channel axis) is grey and is replicated to RGB; three channels are RGB;
  four channels are RGBA, composited on a white background. Other channel counts are rejected.
- An image must be at least 2 pixels on each side and at most 64 times longer on one side
  than on the other. Narrower shapes are strips of data, not pictures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from workers.errors import DatasetError

__all__ = ["MAX_ASPECT_RATIO", "MIN_SIDE", "stack_images", "to_rgb_uint8"]

MIN_SIDE = 2
MAX_ASPECT_RATIO = 64
FLOAT_TOLERANCE = 1e-6

# Items normalised per step: bounds the float64 temporaries of a large float array.
_CHUNK_ITEMS = 1024
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def to_rgb_uint8(image: np.ndarray | Image.Image, *, item: str) -> np.ndarray:
    """Normalise one image to uint8 RGB.

    The module docstring gives the rules. Transparent images (RGBA and LA arrays or Pillow
    images, palette images with a transparent colour) are composited on a white background.

    Parameters
    ----------
    image
        A Pillow image, or an array of shape (H, W) or (H, W, C) with C in 1, 3 or 4.
    item
        Name of the image in error messages, such as ``"npz:/data/x.npz[17]"`` or
        ``"train/cat/3.png"``.

    Returns
    -------
    numpy.ndarray
        C-contiguous uint8 array of shape (H, W, 3).

    Raises
    ------
    DatasetError
        When the image breaks one of the rules; the message names ``item``.
    """
    array = _pil_to_array(image, item) if isinstance(image, Image.Image) else np.asarray(image)
    if array.ndim not in (2, 3):
        raise DatasetError(
            f"{item} has shape {array.shape}; an image must be an array of shape (H, W) or "
            "(H, W, C) with C = 1, 3 or 4",
            field="dataset",
            value=item,
        )
    return normalise_images(array[np.newaxis], where=item, item_name=lambda _: item)[0]


def normalise_images(
    images: np.ndarray, *, where: str, item_name: Callable[[int], str]
) -> np.ndarray:
    """Normalise a stack of images that share one shape and dtype.

    Parameters
    ----------
    images
        Array of shape (n_items, H, W) or (n_items, H, W, C) with C in 1, 3 or 4.
    where
        Name of the whole stack in messages about its shape, e.g. ``"npz:/x.npz[train_x]"``.
    item_name
        Maps an item's position in ``images`` to its name in messages about its values.

    Returns
    -------
    numpy.ndarray
        C-contiguous uint8 array of shape (n_items, H, W, 3).
    """
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.ndim != 4:
        raise DatasetError(
            f"{where} has shape {images.shape}; images must be an array of shape "
            "(n_items, H, W) or (n_items, H, W, C) with C = 1, 3 or 4",
            field="dataset",
            value=where,
        )
    n_items, height, width, channels = images.shape
    _check_channels(images.shape, where)
    _check_geometry(height, width, where)

    out = np.empty((n_items, height, width, 3), dtype=np.uint8)
    for start in range(0, n_items, _CHUNK_ITEMS):
        block = images[start : start + _CHUNK_ITEMS]
        values = _to_uint8(block, start, where, item_name)
        out[start : start + len(block)] = _to_rgb(values)
    return out


def stack_images(
    named_images: Iterable[tuple[str, np.ndarray]], n_items: int, *, where: str
) -> np.ndarray:
    """Stack normalised images of one size into one array, rejecting mixed sizes.

    Parameters
    ----------
    named_images
        ``(name, image)`` pairs, each image of shape (H, W, 3) uint8, in dataset order.
    n_items
        How many pairs ``named_images`` yields.
    where
        Name of the dataset in the mixed-size message.

    Returns
    -------
    numpy.ndarray
        Array of shape (n_items, H, W, 3).
    """
    out: np.ndarray | None = None
    first_name = ""
    count = 0
    for count, (name, image) in enumerate(named_images, start=1):
        if out is None:
            out = np.empty((n_items, *image.shape), dtype=np.uint8)
            first_name = name
        elif image.shape != out.shape[1:]:
            raise DatasetError(
                f"{where} mixes image sizes: {first_name} is {_size(out.shape[1:])} but {name} is "
                f"{_size(image.shape)} (width x height); images are never resized silently, so "
                "resize them all to one size first (e.g. with Pillow's Image.resize)",
                field="dataset",
                value=where,
            )
        out[count - 1] = image
    if out is None or count != n_items:
        raise ValueError(f"expected {n_items} images, got {count}")
    return out


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


def _check_channels(shape: tuple[int, ...], where: str) -> None:
    channels = shape[-1]
    if channels in (1, 3, 4):
        return
    hint = ""
    if shape[1] in (1, 3, 4):
        hint = (
            "; the array looks channels-first, so move the channel axis last "
            "(e.g. np.moveaxis(images, 1, -1))"
        )
    raise DatasetError(
        f"{where} has {channels} channels (shape {shape[1:]}); images need 1 (grey), 3 (RGB) "
        f"or 4 (RGBA) channels on the last axis{hint}",
        field="dataset",
        value=where,
    )


def _check_geometry(height: int, width: int, where: str) -> None:
    short, long = min(height, width), max(height, width)
    if short < MIN_SIDE or long > MAX_ASPECT_RATIO * short:
        raise DatasetError(
            f"{where} is {width}x{height} pixels (width x height); an image needs at least "
            f"{MIN_SIDE} pixels on each side and an aspect ratio of at most {MAX_ASPECT_RATIO}:1, "
            "so reshape the data to its real image size",
            field="dataset",
            value=where,
        )


def _to_uint8(
    block: np.ndarray, offset: int, where: str, item_name: Callable[[int], str]
) -> np.ndarray:
    """Map a block of shape (k, H, W, C) to uint8 values by the dtype rules."""
    dtype = block.dtype
    if dtype == np.uint8:
        return block
    if dtype.kind == "u" and dtype.itemsize == 2:
        # 65535 * 255 fits in uint32; adding half the divisor rounds to nearest (no exact ties,
        # because 65535 / 255 = 257 is odd).
        return ((block.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if dtype.kind in "iu":
        bad = _first_bad(block, lambda b: (b.min(axis=1) < 0) | (b.max(axis=1) > 255))
        if bad is not None:
            values = block[bad]
            raise DatasetError(
                f"{item_name(offset + bad)} contains {dtype} values from {values.min()} to "
                f"{values.max()}; integer images other than uint16 must hold 8-bit values "
                "0..255, so cast 16-bit data to uint16 or rescale it",
                field="dataset",
                value=item_name(offset + bad),
            )
        return block.astype(np.uint8)
    if dtype.kind == "f":
        return _float_to_uint8(block, offset, item_name)
    raise DatasetError(
        f"{where} has dtype {dtype}; images must be uint8, uint16, integers in 0..255 or "
        "floats in [0, 1]",
        field="dataset",
        value=where,
    )


def _float_to_uint8(block: np.ndarray, offset: int, item_name: Callable[[int], str]) -> np.ndarray:
    bad = _first_bad(block, lambda b: ~np.isfinite(b).all(axis=1))
    if bad is not None:
        name = item_name(offset + bad)
        raise DatasetError(
            f"{name} contains NaN or infinite pixel values; replace them before loading",
            field="dataset",
            value=name,
        )
    low, high = -FLOAT_TOLERANCE, 1 + FLOAT_TOLERANCE
    bad = _first_bad(block, lambda b: (b.min(axis=1) < low) | (b.max(axis=1) > high))
    if bad is not None:
        name = item_name(offset + bad)
        values = block[bad]
        raise DatasetError(
            f"{name} contains float values from {values.min():g} to {values.max():g}; float images "
            "must lie in [0, 1], so divide 8-bit data by 255 or pass it as uint8",
            field="dataset",
            value=name,
        )
    scaled = np.clip(block.astype(np.float64), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def _first_bad(block: np.ndarray, is_bad: Callable[[np.ndarray], np.ndarray]) -> int | None:
    """Return the position in ``block`` of the first item flagged by ``is_bad``, or None."""
    flags = is_bad(block.reshape(len(block), -1))
    positions = np.flatnonzero(flags)
    return int(positions[0]) if positions.size else None


def _to_rgb(values: np.ndarray) -> np.ndarray:
    """Map uint8 values of shape (k, H, W, C) to RGB of shape (k, H, W, 3)."""
    channels = values.shape[-1]
    if channels == 3:
        return values
    if channels == 1:
        return np.repeat(values, 3, axis=-1)
    rgb = values[..., :3].astype(np.uint32)
    alpha = values[..., 3:].astype(np.uint32)
    # Straight (not premultiplied) alpha over white, rounded to nearest.
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _pil_to_array(image: Image.Image, item: str) -> np.ndarray:
    """Pixel values of a Pillow image as an array the array rules understand."""
    try:
        if _has_transparency(image):
            return np.asarray(image.convert("RGBA"))
        mode = image.mode
        if mode in _SIXTEEN_BIT_MODES:
            return np.asarray(image).astype(np.uint16)
        if mode == "I":
            return _thirty_two_bit_to_uint16(np.asarray(image), item)
        if mode in ("RGB", "L", "F"):
            return np.asarray(image)
        if mode == "1":
            return np.asarray(image.convert("L"))
        return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{item} cannot be decoded ({exc}); replace or remove the file",
            field="dataset",
            value=item,
        ) from exc


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _thirty_two_bit_to_uint16(array: np.ndarray, item: str) -> np.ndarray:
    # Pillow's "I" mode is how 16-bit greyscale files often arrive, so values must fit 16 bits.
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise DatasetError(
            f"{item} is a 32-bit integer image with values from {array.min()} to {array.max()}; "
            "only 16-bit values 0..65535 are supported, so save it as 8-bit or 16-bit",
            field="dataset",
            value=item,
        )
    return array.astype(np.uint16)
