"""The images a user gives `predict`, as the uint8 [N, 28, 28] arrays the model takes.

- PNG, JPEG (and any other format Pillow reads; the first frame of an animation): turned upright by its EXIF
  orientation, converted to grey by Pillow's "L" mode (ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B;
  alpha is dropped), and resized to 28x28 with Pillow's Lanczos filter (antialiased when it shrinks) when it
  has another size, the aspect ratio not kept. Not inverted: the data sets are a light object on black, so a
  dark object on a light background needs `invert` (`predict --invert`).
- `.npy`: an uint8 array [28, 28] (one image) or [N, 28, 28], taken as it is.
- IDX images (`*-images-idx3-ubyte`, gzipped or not), as the data sets ship: read by the training's reader.
The kind is told by the file's first bytes, not its name; anything else is a DataError of one line.
"""

import dataclasses

import numpy as np

from mnist_flax.errors import DataError, first_line

SIZE = 28
NPY_MAGIC = b"\x93NUMPY"
GZIP_MAGIC = b"\x1f\x8b"
IDX_PREFIX = b"\x00\x00"  # every IDX magic number starts with two zero bytes


@dataclasses.dataclass
class Images:
    """The images of one file: `pixels` uint8 [N, 28, 28]; `indexed`: the file holds an array of them (so each
    is named by its index), not one picture."""

    path: str
    kind: str  # "image", "npy" or "idx"
    pixels: np.ndarray
    indexed: bool


def read(path: str) -> Images:
    """One file's images.

    Raises:
      DataError: no such file, not an image, a truncated one, an array of another shape or type.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if head.startswith(NPY_MAGIC):
        return Images(path, "npy", *_read_npy(path))
    if head.startswith((GZIP_MAGIC, IDX_PREFIX)):
        return Images(path, "idx", _read_idx(path), True)
    return Images(path, "image", _read_picture(path)[None], False)


def invert(pixels: np.ndarray) -> np.ndarray:
    """255 - each pixel: a dark object on a light background as the data sets' light object on black."""
    return (255 - pixels).astype(np.uint8)


def _read_npy(path: str) -> tuple[np.ndarray, bool]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({first_line(e)})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: holds no single array")
    shape_ok = array.shape[-2:] == (SIZE, SIZE) and array.ndim in (2, 3)
    if array.dtype != np.uint8 or not shape_ok:
        raise DataError(
            f"{path}: an array of {array.dtype} {list(array.shape)}; expected uint8 [28, 28] or [N, 28, 28] "
            "(pixels 0-255)"
        )
    if array.ndim == 3 and not len(array):
        raise DataError(f"{path}: holds no image (shape {list(array.shape)})")
    return (array[None], False) if array.ndim == 2 else (array, True)


def _read_idx(path: str) -> np.ndarray:
    from mnist_flax.datasets import _mnist_family

    images = _mnist_family.read_idx(path, _mnist_family.IMAGES_MAGIC)  # DataError: not IDX images, truncated
    if images.ndim != 3 or images.shape[1:] != (SIZE, SIZE) or not len(images):
        raise DataError(f"{path}: IDX images of shape {list(images.shape)}; expected [N, 28, 28] with N > 0")
    return images


def _read_picture(path: str) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decodes it all: a truncated file fails here
            picture = ImageOps.exif_transpose(image).convert("L")
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (nor a .npy array or IDX file)") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise DataError(f"{path}: the image cannot be decoded: {first_line(e)}") from None
    if picture.size != (SIZE, SIZE):
        picture = picture.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(picture, dtype=np.uint8)


def describe(images: Images, index: int) -> str:
    """How an image is named in the output: the file, and its index in an array file."""
    return f"{images.path}[{index}]" if images.indexed else images.path
