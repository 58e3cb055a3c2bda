"""The models, one module each: `mnist_flax/models/NAME.py` defines `Model`, a Linen module, and is model NAME.

As in big_vision, the module's name is the model's name: `importlib.import_module(f"mnist_flax.models.{name}")`
finds it, so a new model is one new file and nothing else names it (a decorator registry would need an
import somewhere to run the decorator). The config's `model` section is `name` plus the Model's own dataclass
fields, checked against them (`check`, `own_fields`); `num_classes` comes from the data, not the config.

The contract is flax's: `Model(**fields, num_classes=N)`, `__call__(x, train: bool)` on float32 images
[N, height, width, channels] in [0, 1], returning logits [N, num_classes]; dropout draws from the "dropout"
rng; any collection besides "params" (BatchNorm's "batch_stats") is carried by the train state, updated in
training (`train=True`), used in evaluation (`train=False`), saved, restored and exported.
"""

import dataclasses
import importlib
import pkgutil

from mnist_flax.errors import ConfigError

# Fields the data gives the model, never the config.
DATA_FIELDS = ("num_classes",)
# Fields of older runs' model sections that the models no longer have (the batch split moved to the step,
# train.batch_split): left out where a recorded config is read back (predict, export, resume).
RETIRED_FIELDS = ("conv_impl", "conv_batch_split")


def registered() -> list[str]:
    """The model names: the modules of this package."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def model_class(name: str) -> type:
    """The `Model` class (a Linen module) of model `name`; ConfigError listing the registered ones if there is none."""
    if name not in registered():
        raise ConfigError(f"model.name: unknown model {name!r} (registered: {', '.join(registered())})")
    module = importlib.import_module(f"{__name__}.{name}")
    if not hasattr(module, "Model"):
        raise ConfigError(f"model.name: mnist_flax/models/{name}.py defines no Model class")
    return module.Model


def fields(name: str) -> list[str]:
    """The fields model `name` declares (its Linen module's dataclass fields), those the data gives excluded."""
    declared = [f.name for f in dataclasses.fields(model_class(name)) if f.init and f.name not in ("parent", "name")]
    return [f for f in declared if f not in DATA_FIELDS]


def check(model_config: dict) -> None:
    """Raises ConfigError for a model section no model can be built from: an unregistered name, a field the
    model does not declare and no other registered model does either (a misspelt one)."""
    name = model_config.get("name")
    declared = fields(name)
    for field in model_config:
        if field == "name" or field in declared:
            continue
        if field in RETIRED_FIELDS:
            raise ConfigError(
                f"model.{field}: no longer a model field (the batch split is train.batch_split); remove it"
            )
        if field in DATA_FIELDS:
            raise ConfigError(f"model.{field}: comes from the data set, not the config")
        if not any(field in fields(other) for other in registered()):
            raise ConfigError(
                f"model.{field}: the {name} model has no field {field!r} (its fields: {', '.join(declared) or 'none'})"
            )


def own_fields(model_config) -> dict:
    """The model section with only the named model's own fields: a field of another registered model (a config
    written for it, run with another `model.name`, as a sweep over architectures does) is left out, so the run
    records the fields its model was built from."""
    model_config = {k: v for k, v in dict(model_config).items() if k not in RETIRED_FIELDS}
    check(model_config)
    declared = fields(model_config["name"])
    return {k: v for k, v in model_config.items() if k == "name" or k in declared}


def create(model_config, num_classes: int):
    """The model a model section names (its own fields: `own_fields`), with `num_classes` from the data."""
    model_config = own_fields(model_config)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items() if k != "name"}
    return model_class(model_config["name"])(**kwargs, num_classes=num_classes)


def count_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    import jax  # noqa: PLC0415 (checking a config needs no JAX)

    return sum(int(p.size) for p in jax.tree.leaves(params))
