"""The images a user gives `predict`, made the uint8 [N, height, width, channels] arrays the model takes.

`read` decodes a file and checks it is images at all (before any model is loaded); `fit` then makes them the
size and channels the model's data set has (its recorded description's image shape):

- PNG, JPEG (and any other format Pillow reads; the first frame of an animation): turned upright by its EXIF
  orientation; a grey picture stays grey, any other becomes RGB (alpha is dropped). Resized to the model's
  height and width with Pillow's Lanczos filter (antialiased when it shrinks) when it has another size, the
  aspect ratio not kept. Not inverted: the MNIST family are a light object on black, so a dark object on a light
  background needs `invert` (`predict --invert`).
- `.npy`: an uint8 array [H, W] (one grey image), [N, H, W] (grey) or [N, H, W, C] (C = 1 or 3), of the model's
  height and width, taken as it is.
- IDX images (`*-images-idx3-ubyte`, gzipped or not), as the MNIST family ships: grey [N, H, W].

Channels other than the model's are converted, and `fit` says so in its `note`: colour to grey by Pillow's "L"
(ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B, rounded as Pillow does), grey to colour by repeating it.
The kind is told by the file's first bytes, not its name; anything else is a DataError of one line.
"""

import dataclasses

import numpy as np

from mnist_flax.errors import DataError, first_line

NPY_MAGIC = b"\x93NUMPY"
GZIP_MAGIC = b"\x1f\x8b"
IDX_PREFIX = b"\x00\x00"  # every IDX magic number starts with two zero bytes
CHANNEL_NAMES = {1: "grey", 3: "colour (RGB)"}


@dataclasses.dataclass
class Images:
    """The images of one file: `pixels` uint8 [N, H, W, C]; `indexed`: the file holds an array of them (so each
    is named by its index), not one picture. `shape`: the array's shape as the file holds it. `note`: what
    `fit` converted (channels), else ""."""

    path: str
    kind: str  # "image", "npy" or "idx"
    pixels: np.ndarray
    indexed: bool
    shape: list[int]
    note: str = ""


def read(path: str) -> Images:
    """One file's images, as the file has them (`fit` makes them the model's).

    Raises:
      DataError: no such file, not an image, a truncated one, an array of another type or form.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if head.startswith(NPY_MAGIC):
        array = _read_npy(path)
        pixels = array[None, ..., None] if array.ndim == 2 else array[..., None] if array.ndim == 3 else array
        return Images(path, "npy", pixels, array.ndim > 2, list(array.shape))
    if head.startswith((GZIP_MAGIC, IDX_PREFIX)):
        array = _read_idx(path)
        return Images(path, "idx", array[..., None], True, list(array.shape))
    picture = _read_picture(path)
    return Images(path, "image", picture[None], False, list(picture.shape))


def fit(images: Images, image_shape: tuple[int, int, int]) -> Images:
    """The images as the model takes them: uint8 [N, height, width, channels] of `image_shape`; channels
    converted (said in `note`), pictures resized, arrays of another height or width refused.

    Raises:
      DataError: an array (.npy, IDX) of another height or width than the model's.
    """
    height, width, channels = image_shape
    pixels, note = images.pixels, ""
    if images.kind != "image" and pixels.shape[1:3] != (height, width):
        expected = f"[{height}, {width}], [N, {height}, {width}] or [N, {height}, {width}, C]"
        raise DataError(
            f"{images.path}: an array of {pixels.dtype} {images.shape}; expected uint8 {expected} (the model "
            f"takes {height}x{width} images, pixels 0-255)"
        )
    have = pixels.shape[-1]
    if have != channels:
        pixels = _convert_channels(pixels, channels)
        note = (
            f"{images.path}: {CHANNEL_NAMES.get(have, f'{have} channels')} images converted to "
            f"{CHANNEL_NAMES.get(channels, f'{channels} channels')}, as the model takes"
        )
    if pixels.shape[1:3] != (height, width):
        pixels = np.stack([_resize(image, height, width) for image in pixels])
    return dataclasses.replace(images, pixels=pixels, note=note)


def invert(pixels: np.ndarray) -> np.ndarray:
    """255 - each pixel: a dark object on a light background as the data sets' light object on black."""
    return (255 - pixels).astype(np.uint8)


def _convert_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """[N, H, W, C] to `channels`: colour to grey by Pillow's luma (its integer rounding), grey to colour by
    repeating it; anything else by the grey of its first three channels (or its first)."""
    if channels == 1:
        if pixels.shape[-1] >= 3:
            rgb = pixels[..., :3].astype(np.uint32)
            luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
            return luma.astype(np.uint8)[..., None]
        return pixels[..., :1]
    grey = pixels if pixels.shape[-1] == 1 else _convert_channels(pixels, 1)
    return np.repeat(grey, channels, axis=-1)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """One [H, W, C] image to [height, width, C] by Pillow's Lanczos filter, channel by channel."""
    from PIL import Image

    planes = [
        np.asarray(Image.fromarray(image[..., c], mode="L").resize((width, height), Image.Resampling.LANCZOS))
        for c in range(image.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def _read_npy(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({first_line(e)})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: holds no single array")
    form_ok = array.ndim in (2, 3) or (array.ndim == 4 and array.shape[-1] in (1, 3))
    if array.dtype != np.uint8 or not form_ok:
        raise DataError(
            f"{path}: an array of {array.dtype} {list(array.shape)}; expected uint8 [H, W], [N, H, W] or "
            "[N, H, W, C] with C = 1 or 3 (pixels 0-255)"
        )
    if array.ndim >= 3 and not len(array):
        raise DataError(f"{path}: holds no image (shape {list(array.shape)})")
    return array


def _read_idx(path: str) -> np.ndarray:
    from mnist_flax.datasets import _mnist_family

    images = _mnist_family.read_idx(path, _mnist_family.IMAGES_MAGIC)  # DataError: not IDX images, truncated
    if images.ndim != 3 or not len(images):
        raise DataError(f"{path}: IDX images of shape {list(images.shape)}; expected [N, H, W] with N > 0")
    return images


def _read_picture(path: str) -> np.ndarray:
    """[H, W, 1] for a grey picture, [H, W, 3] for any other."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decodes it all: a truncated file fails here
            upright = ImageOps.exif_transpose(image)
            grey = upright.mode in ("1", "L", "LA", "I", "I;16", "F")
            picture = upright.convert("L" if grey else "RGB")
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (nor a .npy array or IDX file)") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise DataError(f"{path}: the image cannot be decoded: {first_line(e)}") from None
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[..., None] if grey else pixels


def describe(images: Images, index: int) -> str:
    """How an image is named in the output: the file, and its index in an array file."""
    return f"{images.path}[{index}]" if images.indexed else images.path
