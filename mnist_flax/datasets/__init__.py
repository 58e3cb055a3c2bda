"""The data sets, one module each: `mnist_flax/datasets/NAME.py` is data set NAME.

As for models (`mnist_flax/models/`), the module's name is the data set's name: `importlib.import_module(
f"mnist_flax.datasets.{name}")` finds it, so a new data set is one new file and nothing else names it. A module
whose name starts with `_` is a helper, not a data set.

A data set module defines:

- `load(data_config) -> Arrays`: the arrays (uint8 images [N, height, width, channels], int32 labels [N]) of
  its train and test splits (and its validation split, where the source has one), and their `Description`
  (`arrays(...)` builds both from the splits).
- `FIELDS` (optional): {field: default} of the `data.*` fields it reads besides the generic ones (GENERIC_FIELDS,
  which every data set has). A field in the config's `data` section that the named data set does not declare is
  a ConfigError, unless it is another data set's field at that data set's default (a config written for one
  data set, run with another `data.name`).
- `resolve(data_config) -> dict` (optional): its fields with every "auto" decided for this machine (where the
  files are), as the run records them.

Everything downstream reads the `Description` (image shape, class names) as the run recorded it, never a
constant: the model's input and output sizes, metrics, predict, export, the model card, compare, the notebooks.
"""

import dataclasses
import hashlib
import importlib
import pkgutil

import numpy as np

from mnist_flax.errors import ConfigError, DataError

# Fields every data set has: they say how the arrays are split, subset and augmented, not where they come from.
GENERIC_FIELDS = ("name", "validation_size", "train_subset", "eval_subset", "augment")


@dataclasses.dataclass(frozen=True)
class Description:
    """What a data set is: every consumer reads this (as recorded with the run), never a constant.

    name: the data set's registered name. image_shape: (height, width, channels) of every image. class_names: the
    classes in label order (label i is class_names[i]). source: where the arrays came from ("idx:FOLDER",
    "tfds:NAME", "sklearn:digits"). fingerprint: SHA-256 of the arrays as the source gave them (every split,
    before a validation split is held out).
    """

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    source: str
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        """As JSON holds it (the run's records)."""
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "class_names": list(self.class_names),
            "source": self.source,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, fields: dict) -> "Description":
        """From a record (`to_dict`'s form)."""
        return cls(
            name=str(fields["name"]),
            image_shape=tuple(int(n) for n in fields["image_shape"]),
            class_names=tuple(str(c) for c in fields["class_names"]),
            source=str(fields.get("source", "")),
            fingerprint=str(fields.get("fingerprint", "")),
        )


@dataclasses.dataclass(frozen=True)
class Split:
    """One split on the host: images (N, height, width, channels) uint8, labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Arrays:
    """What a data set module's `load` returns: its splits as the source has them, and their description.
    `validation` is None where the source has no validation split (one is then held out of train)."""

    description: Description
    train: Split
    test: Split
    validation: Split | None = None


def fingerprint(*splits: Split) -> str:
    """SHA-256 of the splits' arrays: their dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for split in splits:
        for array in (split.images, split.labels):
            digest.update(str((array.dtype, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def arrays(name: str, class_names, source: str, train: Split, test: Split, validation: Split | None = None) -> Arrays:
    """A module's `load` result: the splits, described (image shape from the arrays, fingerprint of them all)."""
    given = [s for s in (train, validation, test) if s is not None]
    description = Description(
        name=name,
        image_shape=tuple(int(n) for n in train.images.shape[1:]),
        class_names=tuple(str(c) for c in class_names),
        source=source,
        fingerprint=fingerprint(*given),
    )
    return Arrays(description, train, test, validation)


# Runs recorded before the description was: every data set was one of the MNIST family, 28x28 grey in 10 classes.
LEGACY_IMAGE_SHAPE = (28, 28, 1)
LEGACY_NAMES = ("fashion_mnist", "mnist")


def recorded(fields: dict | None, name: str | None = None) -> Description:
    """The description a run recorded (`Description.to_dict`'s form); for a run recorded before there was one,
    its data set `name` as every data set then was: 28x28 grey, Fashion-MNIST's or MNIST's 10 classes (the
    labels as text for another name). Source and fingerprint are then unknown ("")."""
    if fields:
        return Description.from_dict(fields)
    name = name or "fashion_mnist"
    class_names = module(name).CLASS_NAMES if name in LEGACY_NAMES else tuple(str(label) for label in range(10))
    return Description(name, LEGACY_IMAGE_SHAPE, class_names, source="", fingerprint="")


def describe_shape(description: Description) -> str:
    """ "fashion_mnist (28x28x1, 10 classes)": how a refusal names a data set."""
    height, width, channels = description.image_shape
    return f"{description.name} ({height}x{width}x{channels}, {description.num_classes} classes)"


# ---------------------------------------------------------------- the registry


def registered() -> list[str]:
    """The data set names: the modules of this package."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def module(name: str):
    """Data set `name`'s module; ConfigError listing the registered ones if there is none."""
    if name not in registered():
        raise ConfigError(f"data.name: unknown data set {name!r} (registered: {', '.join(registered())})")
    found = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(found, "load", None)):
        raise ConfigError(f"data.name: mnist_flax/datasets/{name}.py defines no load(data_config) function")
    return found


def fields(name: str) -> dict:
    """{field: default} of the `data.*` fields data set `name` declares besides GENERIC_FIELDS."""
    return dict(getattr(module(name), "FIELDS", {}))


def _is_default_elsewhere(field: str, value) -> bool:
    """Whether `field` is some registered data set's field and `value` its default there."""
    return any(field in fields(other) and fields(other)[field] == value for other in registered())


def check(data_config) -> None:
    """Raises ConfigError for a `data` section no data set can be loaded from: an unregistered name, or a field
    the data set does not declare (unless it is another data set's, at its default)."""
    data_config = dict(data_config)
    name = data_config.get("name")
    declared = fields(name)
    for field, value in data_config.items():
        if field in GENERIC_FIELDS or field in declared or _is_default_elsewhere(field, value):
            continue
        own = ", ".join([*GENERIC_FIELDS[1:], *declared])
        raise ConfigError(f"data.{field}: the {name} data set has no field {field!r} (its fields: {own})")


def own_fields(data_config) -> dict:
    """The `data` section with the generic fields and the named data set's own (declared ones it lacks take their
    defaults); another data set's fields at their defaults are left out, so the run records what it read."""
    data_config = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in dict(data_config).items()}
    check(data_config)
    declared = fields(data_config["name"])
    own = {k: v for k, v in data_config.items() if k in GENERIC_FIELDS or k in declared}
    own.update({k: default for k, default in declared.items() if k not in own})
    return own


def resolve(data_config) -> dict:
    """`own_fields`, with the data set's "auto" fields decided (its module's `resolve`, where it has one)."""
    own = own_fields(data_config)
    resolver = getattr(module(own["name"]), "resolve", None)
    if resolver is not None:
        own.update(resolver(_Fields(own)))
    return own


class _Fields(dict):
    """A dict whose keys read as attributes too (`data_config.local_dir`), as a ConfigDict's do."""

    __getattr__ = dict.__getitem__


def load(data_config) -> Arrays:
    """The named data set's arrays and description, checked: uint8 images [N, H, W, C] of one shape in every
    split, int32 labels [N] within the class names. A module that breaks this is a DataError naming it."""
    check(data_config)
    if isinstance(data_config, dict):
        data_config = _Fields(data_config)
    name = data_config.name
    loaded = module(name).load(data_config)
    description = loaded.description
    where = f"data set {name} ({description.source})"
    if len(description.image_shape) != 3 or min(description.image_shape) < 1:
        raise DataError(f"{where}: image shape {description.image_shape} is not (height, width, channels)")
    if description.num_classes < 2:
        raise DataError(f"{where}: {description.num_classes} class(es); a classifier needs at least 2")
    for split_name in ("train", "validation", "test"):
        split = getattr(loaded, split_name)
        if split is None:
            continue
        images, labels = split.images, split.labels
        if images.dtype != np.uint8 or images.shape[1:] != description.image_shape:
            raise DataError(
                f"{where}: {split_name} images are {images.dtype} {list(images.shape)}, expected uint8 "
                f"[N, {', '.join(map(str, description.image_shape))}]"
            )
        if labels.dtype != np.int32 or labels.shape != (len(images),):
            raise DataError(f"{where}: {split_name} labels are {labels.dtype} {list(labels.shape)}, expected int32 [N]")
        if len(labels) and (labels.min() < 0 or labels.max() >= description.num_classes):
            raise DataError(
                f"{where}: {split_name} label {int(labels.max())} is out of range 0..{description.num_classes - 1}"
            )
    return loaded
