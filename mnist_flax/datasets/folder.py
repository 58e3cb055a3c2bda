"""Your own images, one sub-folder per class (torchvision's ImageFolder layout): `data.folder=DIR`.

    DIR/cat/001.png  DIR/cat/002.jpg  DIR/dog/a.jpeg ...           split by a fixed rule (test_fraction, ...)
    DIR/train/cat/...  DIR/test/cat/...  [DIR/validation/cat/...]  split as the sub-folders say

The class names are the class sub-folders' names, sorted (label i is the i-th). A class folder may hold
sub-folders of its own; every PNG or JPEG below it is one of its images. Each image, of any size, grey or colour,
is turned upright by its EXIF orientation, converted to grey (Pillow's "L", alpha dropped) or RGB, and resized
to `image_size` with Pillow's Lanczos filter, the aspect ratio not kept: the conversion `predict` does.

Files and folders whose name starts with "." are skipped (.DS_Store, .git). Any other file that is not a .png,
.jpg or .jpeg, and an image the decoder cannot read, is a DataError naming it: a stray file is refused rather
than left out unseen.

Without train/ and test/ sub-folders, each class's images are ranked by the SHA-256 of their path (a fixed
shuffle: every run, on every machine, gets the same split, and adding an image moves at most a boundary one);
the first `test_fraction` of them are the test split, the next `validation_fraction` the validation split.
With them and without validation/, `validation_fraction` of each class's train/ images are held out the same way.
Either way the folder gives its own validation split, so the generic `data.validation_size` is not used.

Decoded once: the arrays are kept in a cache file named by the SHA-256 of every image's bytes and path and of
the conversion (`image_size`, `channels`), in $MNIST_FLAX_DATA_CACHE, else $XDG_CACHE_HOME/mnist_flax/folder
(~/.cache/mnist_flax/folder). A later run hashes the files again (about a second a GB) and reads the cache; a
changed, added or removed image, or another size or channel count, is another key and a new decode.

Held in memory, as every data set: the decoded images (height x width x channels bytes each) live on the host
and on the device for the whole run. Up to MAX_BYTES (2 GiB) of them are loaded: some 2.7 million images at
28x28 grey, 175,000 at 64x64 RGB, 14,000 at 224x224 RGB. A run holds up to about six times the decoded bytes
at its peak (measured: 5.7x for 300 MB; the cached array, the split copies, the hashes' byte copies, the device
copy), so 2 GiB comes to some 12 GiB, which leaves room on a 24 GiB, 2-core machine shared with other work. A
larger folder is refused with one line before anything is decoded.
"""

import concurrent.futures
import hashlib
import os

import numpy as np

from mnist_flax.datasets import Split, arrays
from mnist_flax.errors import ConfigError, DataError, first_line

FIELDS = {
    "folder": "",  # the root folder of the images
    "image_size": (28, 28),  # (height, width) every image is resized to; one number for a square
    "channels": 1,  # 1: grey, 3: RGB
    "test_fraction": 0.1,  # of each class, without a test/ sub-folder
    "validation_fraction": 0.1,  # of each class (of train/ with sub-folders), without a validation/ sub-folder
}
EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "validation", "test")
MAX_BYTES = 2 * 1024**3  # of decoded images; see the module's docstring
CACHE_ENV = "MNIST_FLAX_DATA_CACHE"
# Part of every cache key: raise it when the decoding changes, so no cache entry of the old decoding is read.
FORMAT = 1
SPLIT_SALT = b"mnist_flax folder split 1"


# ---------------------------------------------------------------- the fields


def settings(data_config) -> tuple[str, tuple[int, int], int, float, float]:
    """(folder, (height, width), channels, test_fraction, validation_fraction), checked.

    Raises:
      ConfigError: a field of the wrong kind or out of range. DataError: the folder does not exist.
    """
    folder = data_config.folder
    if not folder:
        raise ConfigError("data.folder: not set; give the folder of your images, one sub-folder per class")
    if not os.path.isdir(folder):
        raise DataError(f"data.folder: {folder} is not a folder")
    size = data_config.image_size
    size = [size] if isinstance(size, int) else list(size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size):
        given = data_config.image_size
        raise ConfigError(f"data.image_size: expected (height, width) or one number >= 1, got {given!r}")
    channels = data_config.channels
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"data.channels: expected 1 (grey) or 3 (RGB), got {channels!r}")
    fractions = []
    for name in ("test_fraction", "validation_fraction"):
        value = data_config[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"data.{name}: expected a fraction in [0, 1), got {value!r}")
        fractions.append(float(value))
    if sum(fractions) >= 1:
        raise ConfigError(
            f"data.test_fraction + data.validation_fraction: {sum(fractions):g} leaves nothing to train on"
        )
    return os.path.abspath(folder), (size[0], size[1]), channels, *fractions


def resolve(data_config) -> dict:
    """The folder as an absolute path and the size as (height, width), as the run records them."""
    folder, size, *_ = settings(data_config)
    return {"folder": folder, "image_size": list(size)}


# ---------------------------------------------------------------- the files


def _visible(names) -> list[str]:
    return sorted(name for name in names if not name.startswith("."))


def _subfolders(folder: str) -> list[str]:
    return [n for n in _visible(os.listdir(folder)) if os.path.isdir(os.path.join(folder, n))]


def _refuse_loose_files(folder: str, what: str) -> None:
    for name in _visible(os.listdir(folder)):
        if not os.path.isdir(os.path.join(folder, name)):
            raise DataError(f"{os.path.join(folder, name)}: a file {what}; move it out (or start its name with '.')")


def _class_images(class_folder: str) -> list[str]:
    """Every image below a class folder (sorted paths); DataError for another file or for none."""
    found = []
    for parent, folders, names in os.walk(class_folder):
        folders[:] = _visible(folders)
        for name in _visible(names):
            path = os.path.join(parent, name)
            if not name.lower().endswith(EXTENSIONS):
                raise DataError(f"{path}: not a PNG or JPEG image (.png, .jpg, .jpeg); move it out of the folder")
            found.append(path)
    if not found:
        raise DataError(f"{class_folder}: an empty class (no .png, .jpg or .jpeg image in it)")
    return sorted(found)


def _classes(folder: str, min_classes: int = 2) -> dict[str, list[str]]:
    """{class name: its images} of a folder of class folders."""
    names = _subfolders(folder)
    if not names:
        raise DataError(f"{folder}: no class sub-folders (one sub-folder of images per class is expected)")
    _refuse_loose_files(folder, "beside the class folders")
    if len(names) < min_classes:
        raise DataError(f"{folder}: {len(names)} class sub-folder ({names[0]}); a classifier needs at least 2")
    return {name: _class_images(os.path.join(folder, name)) for name in names}


def find_images(folder: str) -> tuple[list[str], list[tuple[str, int, str | None]]]:
    """(class names, [(path, label, split or None)]): the split is the sub-folder's (train/, validation/, test/),
    None where the folder is not split into them."""
    given = [s for s in SPLITS if os.path.isdir(os.path.join(folder, s))]
    if not given:
        by_class = _classes(folder)
        names = list(by_class)
        return names, [(path, names.index(c), None) for c, paths in by_class.items() for path in paths]
    missing = [s for s in ("train", "test") if s not in given]
    if missing:
        raise DataError(f"{folder}: has {'/, '.join(given)}/ but no {missing[0]}/ (train/ and test/ go together)")
    _refuse_loose_files(folder, "beside train/ and test/")
    others = [n for n in _subfolders(folder) if n not in SPLITS]
    if others:
        where = os.path.join(folder, others[0])
        raise DataError(f"{where}: a folder beside train/ and test/ (the class folders go in them)")
    split_classes = {s: _classes(os.path.join(folder, s), min_classes=2 if s == "train" else 1) for s in given}
    names = list(split_classes["train"])
    files = []
    for split, by_class in split_classes.items():
        for name, paths in by_class.items():
            if name not in names:
                raise DataError(f"{os.path.join(folder, split, name)}: a class that train/ does not have")
            files += [(path, names.index(name), split) for path in paths]
    return names, files


def content_key(folder: str, files, size: tuple[int, int], channels: int) -> str:
    """SHA-256 of every image's path (below `folder`), label, split and bytes, and of the conversion."""
    digest = hashlib.sha256(repr((FORMAT, size, channels)).encode())
    for path, label, split in files:
        digest.update(repr((os.path.relpath(path, folder), label, split)).encode())
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    return digest.hexdigest()


# ---------------------------------------------------------------- decoding


def decode(path: str, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image file as uint8 [height, width, channels]; DataError naming the file if it cannot be decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    height, width = size
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as image:
            image.draft("RGB" if channels == 3 else "L", (max(size), max(size)))  # a JPEG decodes at a smaller scale
            image.load()  # decodes it all: a truncated file fails here
            picture = ImageOps.exif_transpose(image).convert("RGB" if channels == 3 else "L")
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a PNG or JPEG image (the file's contents are something else)") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise DataError(f"{path}: the image cannot be decoded ({first_line(e)})") from None
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(picture, dtype=np.uint8).reshape(height, width, channels)


def _decode_all(paths: list[str], size, channels: int) -> np.ndarray:
    """The images, decoded on every core (Pillow lets go of Python's lock while it decodes)."""
    images = np.empty((len(paths), *size, channels), np.uint8)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for i, image in enumerate(pool.map(lambda p: decode(p, size, channels), paths)):
            images[i] = image
    return images


def cache_folder() -> str:
    """Where decoded folders are kept: $MNIST_FLAX_DATA_CACHE, else $XDG_CACHE_HOME/mnist_flax/folder."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mnist_flax", "folder")


def decoded(files, size, channels: int, key: str) -> np.ndarray:
    """The images of `files`, from the cache file named by `key`, else decoded and then cached.

    A cache file that cannot be read (cut short, another form) is decoded again. One that cannot be written (a
    read-only home) leaves the run to go on without it.
    """
    path = os.path.join(cache_folder(), f"{key}.npy")
    expected = (len(files), *size, channels)
    try:
        images = np.load(path, allow_pickle=False)
        if images.dtype == np.uint8 and images.shape == expected:
            return images
    except (OSError, ValueError, EOFError):
        pass
    images = _decode_all([f[0] for f in files], size, channels)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "wb") as f:
            np.save(f, images)
        os.replace(temporary, path)
    except OSError:
        if os.path.exists(temporary):
            os.remove(temporary)
    return images


# ---------------------------------------------------------------- the splits


def _rank(folder: str, path: str) -> bytes:
    return hashlib.sha256(SPLIT_SALT + os.path.relpath(path, folder).encode()).digest()


def assign_splits(folder: str, files, test_fraction: float, validation_fraction: float) -> list[str]:
    """Each file's split: its sub-folder's, else drawn per class by the fixed rule (see the module's docstring)."""
    splits = [split for _, _, split in files]
    has_validation = "validation" in splits
    groups: dict[int, list[int]] = {}
    for i, (_, label, split) in enumerate(files):
        if split is None or (split == "train" and not has_validation):
            groups.setdefault(label, []).append(i)
    for members in groups.values():
        members.sort(key=lambda i: _rank(folder, files[i][0]))
        split_by_folder = files[members[0]][2] is not None
        num_test = 0 if split_by_folder else round(len(members) * test_fraction)
        num_validation = round(len(members) * validation_fraction)
        for n, i in enumerate(members):
            splits[i] = "test" if n < num_test else "validation" if n < num_test + num_validation else "train"
    return splits


def load(data_config):
    """The folder's images, converted, split and described (`mnist_flax.datasets` contract)."""
    folder, size, channels, test_fraction, validation_fraction = settings(data_config)
    class_names, files = find_images(folder)
    image_bytes = size[0] * size[1] * channels
    if len(files) * image_bytes > MAX_BYTES:
        gib = len(files) * image_bytes / 2**30
        raise DataError(
            f"{folder}: {len(files):,} images of {size[0]}x{size[1]}x{channels} bytes = {gib:.1f} GiB decoded, "
            f"more than the {MAX_BYTES / 2**30:g} GiB held in memory; lower data.image_size or "
            "data.channels, or use fewer images"
        )
    images = decoded(files, size, channels, content_key(folder, files, size, channels))
    labels = np.array([label for _, label, _ in files], np.int32)
    splits = np.array(assign_splits(folder, files, test_fraction, validation_fraction))
    parts = {}
    for split in SPLITS:
        chosen = splits == split
        if not chosen.any():
            field = "validation_fraction" if split == "validation" else "test_fraction"
            raise DataError(
                f"{folder}: the {split} split is empty ({len(files)} images); add images or raise data.{field}"
            )
        parts[split] = Split(images[chosen], labels[chosen])
    return arrays("folder", class_names, f"folder:{folder}", parts["train"], parts["test"], parts["validation"])
