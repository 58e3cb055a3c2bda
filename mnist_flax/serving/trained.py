"""A trained model read back for inference: its config, its parameters, the step they are from.

From a run workdir (its best model: the checkpoint at final_metrics.json's best validation step), from a
checkpoints folder (the kept step with the best validation accuracy), from one checkpoint step folder, or
from a W&B `model` artifact (a step folder, downloaded). The model is rebuilt from the config the run recorded
(`models.create`), and its variables (the parameters and any other collection, e.g. BatchNorm's batch
statistics) are checked against it, so a checkpoint of another model is one line, not a failure deep inside a
call.
"""

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from mnist_flax import datasets, layout, models
from mnist_flax.errors import CheckpointError, ConfigError, MnistFlaxError, first_line
from mnist_flax.records import files, runs
from mnist_flax.training import checkpointing, steps


@dataclasses.dataclass
class TrainedModel:
    """A model's variables and the config that describes it."""

    config: dict  # the resolved config, nested, as the run (or the checkpoint's metadata) recorded it
    params: dict  # the parameter pytree, as NumPy arrays
    step: int  # the training step of the checkpoint
    checkpoint: str  # the checkpoint step folder the parameters were read from
    model_state: dict = dataclasses.field(default_factory=dict)  # the model's other collections (batch_stats)
    data: dict | None = None  # the data set's description as the run recorded it (data.json; a checkpoint's "data")

    @property
    def model_config(self) -> dict:
        return self.config["model"]

    @property
    def data_name(self) -> str:
        return self.config["data"]["name"]

    @property
    def description(self) -> datasets.Description:
        """The data set it was trained on, as recorded (a run recorded before there was one: as its data set then
        was, 28x28 grey in 10 classes)."""
        return datasets.recorded(self.data, self.data_name)

    @property
    def class_names(self) -> list[str]:
        """The classes its outputs stand for, in label order."""
        return list(self.description.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of the images the model takes."""
        return self.description.image_shape

    @property
    def variables(self) -> dict:
        """What `module().apply` takes: the parameters and the model's other collections."""
        return {"params": self.params, **self.model_state}

    def module(self):
        """The Flax module its recorded config names (fields of older runs that models no longer have left out)."""
        return models.create(ml_collections.ConfigDict(self.model_config), num_classes=self.description.num_classes)

    def probabilities_fn(self) -> Callable:
        """fn(variables, images) -> class probabilities [N, classes] float32, for uint8 images [N, height, width,
        channels] (`image_shape`; grey ones also as [N, height, width]): the model's own preprocessing
        (steps.preprocess) and the model in evaluation (train=False: BatchNorm by its running averages), then a
        softmax. Every export format holds this function."""
        module, grey = self.module(), self.image_shape[-1] == 1

        def probabilities(variables, images):
            if grey and images.ndim == 3:
                images = images[..., None]  # [N, H, W, 1], as the training's batches
            return jax.nn.softmax(module.apply(variables, steps.preprocess(images), train=False), axis=-1)

        return probabilities


# ---------------------------------------------------------------- where a model comes from


def from_run(workdir: str) -> TrainedModel:
    """A run's best model: for a finished run the checkpoint at final_metrics.json's best validation step; for
    one that has not finished (still training, stopped) its kept step with the best validation accuracy (the
    latest where none has one).

    Raises:
      CheckpointError: the run has no checkpoint of its best step (or none at all).
    """
    record = runs.load(workdir, history=False, predictions=False)
    if record.source != "workdir":
        raise ConfigError(f"{workdir} is not a run workdir (no {layout.CONFIG}): name the run's workdir")
    directory = os.path.join(record.path, layout.CHECKPOINTS)
    saved = checkpointing.SavedCheckpoints(directory) if os.path.isdir(directory) else None
    kept = saved.all_steps() if saved else []
    if record.finished:
        step = (record.final.get("best_validation") or {}).get("step")
        if step is None:
            raise CheckpointError(f"run {record.path} finished without a validation, so it has no best model")
        if step not in kept:
            raise CheckpointError(
                f"run {record.path} has no checkpoint of its best model "
                f"(step {step}; kept steps: {', '.join(map(str, kept)) or 'none'})"
            )
    elif kept:
        step = saved.best_step()
    else:
        raise CheckpointError(f"run {record.path} has no checkpoint (no complete step in {directory})")
    config = files.read_json(os.path.join(record.path, layout.CONFIG))
    return _load(saved, step, config, files.read_json(os.path.join(record.path, layout.DATA), None))


def from_checkpoints(location: str) -> TrainedModel:
    """One step folder (RUN/checkpoints/STEP, or a W&B model artifact), else the kept step of a checkpoints folder
    with the best validation accuracy (the latest where none has one): the model its metadata names."""
    saved = _saved(location, location)
    step = saved.best_step()
    meta = saved.read_meta(step)
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(
            f"{saved.path(step)}: the checkpoint's metadata names no model config (not an mnist_flax model)"
        )
    return _load(saved, step, config, meta.get("data"))


def _saved(location: str, owner: str) -> checkpointing.SavedCheckpoints:
    """A step folder or a checkpoints folder with at least one complete step."""
    saved = checkpointing.SavedCheckpoints(location) if os.path.isdir(location) else None
    if saved is None or not (saved.folder or saved.all_steps()):
        raise CheckpointError(f"{owner} has no checkpoint (no complete step in {location})")
    return saved


def open_model(reference: str) -> TrainedModel:
    """A run workdir, a checkpoints folder, one step folder, or a W&B model artifact `entity/project/name:alias`."""
    path = os.path.abspath(os.path.expanduser(reference))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, layout.CONFIG)):
            return from_run(path)
        if checkpointing.is_step_folder(path) or checkpointing.SavedCheckpoints(path).all_steps():
            return from_checkpoints(path)
        raise CheckpointError(
            f"{path} is no run workdir, checkpoints folder, checkpoint step, model artifact or export"
        )
    if runs.is_wandb_path(reference) and ":" in reference:
        return from_checkpoints(download(reference))
    raise ConfigError(f"{reference}: no such folder, and not a W&B model artifact (entity/project/name:alias)")


def download(reference: str) -> str:
    """A W&B model artifact's local folder (downloaded); needs a key."""
    from mnist_flax.tracking import wandb_run

    if wandb_run.read_token() is None:
        raise MnistFlaxError(
            f"{reference}: no such folder, and downloading it as a W&B artifact needs a W&B key: "
            "set WANDB_API_KEY (or WANDB_TOKEN) in the environment, or run `wandb login`"
        )
    try:
        return wandb_run.download_model_artifact(reference)
    except CheckpointError as e:  # its message names init_from, the field it was written for
        raise CheckpointError(str(e).removeprefix("init_from: ")) from None


# ---------------------------------------------------------------- parameters, checked


def _load(saved: checkpointing.SavedCheckpoints, step: int | None, config: dict, data: dict | None) -> TrainedModel:
    """The parameters of a checkpoint step, checked against the model that `config` describes for the data set
    `data` describes (datasets.Description's dict; None for a run recorded before there was one)."""
    folder = saved.path(step)
    trained = TrainedModel(config=config, params={}, step=0, checkpoint=folder, data=data)
    try:
        module = trained.module()
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: the model its config names cannot be built: {first_line(e)}") from None
    state = saved.restore_state(step)
    params = state.get("params") if isinstance(state, dict) else None
    if isinstance(params, dict):  # an older run's CNN named its convolutions Conv3x3_<i>; flax's nn.Conv: Conv_<i>
        params = {name.replace("Conv3x3_", "Conv_"): value for name, value in params.items()}
    model_state = (state.get("model_state") if isinstance(state, dict) else None) or {}
    expected = dict(
        jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, *trained.image_shape)), train=False))
    )
    mismatch = _mismatch(expected, {"params": params, **model_state} if isinstance(params, dict) else None)
    if mismatch:
        described = ", ".join(f"{k}={v}" for k, v in sorted(trained.model_config.items()) if k != "name")
        raise CheckpointError(
            f"{folder} holds the parameters of another model than the {trained.model_config['name']} its config "
            f"names ({described}): {mismatch}"
        )
    trained.params = jax.tree.map(np.asarray, params)
    trained.model_state = jax.tree.map(np.asarray, model_state)
    trained.step = int(np.asarray(state.get("step", 0)))
    return trained


def _mismatch(expected, params) -> str | None:
    """The first difference between the variables a model needs and those a checkpoint holds (None: they fit)."""
    if not isinstance(params, dict):
        return "the checkpoint holds no parameter tree"
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(expected).items()}
    have = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(params).items()}
    for name in sorted(set(want) | set(have)):
        if name not in have:
            return f"{name} is missing"
        if name not in want:
            return f"{name} is not a parameter of this model"
        if tuple(want[name]) != tuple(have[name]):
            return f"{name} is {list(have[name])}, the model needs {list(want[name])}"
    return None
