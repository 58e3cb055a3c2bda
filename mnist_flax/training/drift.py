"""Config drift on resume: a resumed run trains with the config its checkpoint was trained with.

Resuming compares the new resolved config with the one saved beside the
checkpoint. A changed field that changes the training stops the run before
anything is touched; a field that only changes the record, the display or how
the same mathematics is computed may change, and the record says it did.
`resume.allow_config_changes=True` lets any field change, deliberately: the
workdir's `config_history.json` then keeps the earlier config and the step where
the change happened.
"""

import jax

from mnist_flax import datasets
from mnist_flax.config import diff, schema
from mnist_flax.errors import ConfigError, DataError, MnistFlaxError
from mnist_flax.records import provenance

# Fields that may change on resume, and why the training stays the same.
SAFE_ON_RESUME = {
    "wandb.name": "the W&B run's display name",
    "wandb.tags": "labels on the W&B run",
    "wandb.notes": "a note on the W&B run",
    "wandb.group": "how the W&B UI groups runs",
    "wandb.mode": "where the record is sent (offline now, online later once a token is there)",
    "wandb.init_timeout": "how long to wait for the W&B server",
    "wandb.allow_dirty": "whether an online run may start from a dirty tree (the dirty flag is recorded either way)",
    "wandb.log_misclassified": "how many misclassified images the final W&B table shows",
    "log_every_steps": "how often train metrics are logged and shown",
    "tensorboard": "whether TensorBoard event files are written",
    "compile_cache": "where compiled programs are kept (the same programs either way)",
    "checkpoint.upload_to_wandb": "whether checkpoints are also uploaded as W&B artifacts",
    "checkpoint.max_to_keep": "how many old checkpoints are kept on disk",
    "checkpoint.every_epochs": "how often the state is saved (the state itself is the same)",
    "checkpoint.async_save": "whether saves run in the background",
    "eval_batch_size": "evaluation batch: the same predictions, computed in other slices",
    "train.steps_per_call": "how many steps one compiled call fuses (the same steps)",
    "train.scan_unroll": "how fused steps are compiled (the same steps)",
    "train.batch_split": "the pieces the layers before the first Dense run on (the same maths; a dropout layer "
    "among them draws its masks per piece)",
    "data.source": "where the files are read from (the data is checked by its fingerprint)",
    "data.local_dir": "where the files are read from (the data is checked by its fingerprint)",
    "data.tfds_data_dir": "where the TFDS cache is (the data is checked by its fingerprint)",
    "init_from": "ignored on resume: the run's own checkpoint comes first",
    "distributed.coordinator_address": "how the processes find each other",
    "distributed.num_processes": "how many processes share the work (the batch and the steps stay the same)",
    "distributed.process_id": "this process's index",
    "resume.allow_config_changes": "this switch",
    "resume.allow_data_changes": "the data switch",
    "resume.strict_environment": "whether another environment refuses the resume (it is recorded either way)",
}


def check(saved_config: dict, config, step: int, directory: str = "", flat: dict | None = None) -> dict[str, list]:
    """The changes since the checkpoint at `step` was saved; raises ConfigError for those that change the training.

    Args:
      saved_config: the resolved config saved beside the checkpoint (nested, as JSON).
      config: the resolved config of this start (`flat`: its flat form, when the caller has it).
      step, directory: the checkpoint's step and folder, for the message.

    Returns:
      Every change, safe ones included, for the record.
    """
    changed = diff.changes(schema.flatten(saved_config), flat if flat is not None else schema.flatten(config))
    unsafe = {k: v for k, v in changed.items() if k not in SAFE_ON_RESUME}
    if unsafe and not config.resume.allow_config_changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in unsafe.items())
        raise ConfigError(
            f"resuming at step {step} with a different config would train one run with two configs ({listed}; "
            f"the checkpoint in {directory or 'the workdir'} was trained with the earlier values); "
            "use another --workdir, start a new run from this one with --config.init_from=WORKDIR, or pass "
            "--config.resume.allow_config_changes=True to change it deliberately"
        )
    return changed


def check_resume(config, meta: dict, record: dict, step: int, directory: str, flat: dict | None = None) -> list:
    """Refuses a resume that would change the training (config or data); returns the config history to record.

    Args:
      config: the resolved config of this start.
      meta: the metadata saved with the checkpoint at `step` in `directory` (config, provenance, history).
      record: this start's provenance (data fingerprint, environment).
    """
    changed = check(meta["config"], config, step, directory, flat)
    saved = meta.get("provenance") or {}
    differing = provenance.compare_data(saved.get("data"), record["data"])
    if differing and not config.resume.allow_data_changes:
        source = f" from {config.data.source}" if "source" in config.data else ""  # a data set with one source has none
        raise DataError(
            f"resuming at step {step} on other data: the {', '.join(differing)} split(s) differ from the data the "
            f"checkpoint was trained on ({config.data.name}{source}); use the original files, a "
            "new --workdir, or --config.resume.allow_data_changes=True"
        )
    check_environment(config, saved.get("environment"), record["environment"], step)
    history = list(meta.get("config_history") or [])
    if changed:
        history.append({"step": step, "changed": changed, "previous_config": meta["config"]})
        if jax.process_index() == 0:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            print(f"resuming at step {step} with changed fields (recorded in config_history.json): {listed}")
    return history


def check_data_set(saved, current, what: str) -> None:
    """Refuses a checkpoint trained on a data set of other classes or another image shape than this run's: its
    model's input and output sizes are not this run's. `what` says which checkpoint ("resuming at step 20 of
    DIR", "init_from: DIR"); `saved` and `current` are datasets.Description (the checkpoint's as it recorded it).

    Raises:
      DataError: naming both data sets, before anything of the run is changed.
    """
    differs = [
        label
        for label, differ in (
            ("another image shape", saved.image_shape != current.image_shape),
            ("other classes", saved.num_classes != current.num_classes),
        )
        if differ
    ]
    if differs:
        raise DataError(
            f"{what}: the checkpoint was trained on {datasets.describe_shape(saved)}, this run's data set is "
            f"{datasets.describe_shape(current)} ({' and '.join(differs)}): its model does not fit; train a new "
            "run from scratch (no init_from) or in a new --workdir"
        )


def check_environment(config, saved: dict | None, current: dict, step: int) -> None:
    """Another environment than the checkpoint's: a warning naming what differs, or with
    `resume.strict_environment` a refusal (MnistFlaxError)."""
    changed = provenance.compare_environment(saved, current)
    if not changed:
        return
    listed = provenance.describe_changes(changed)
    if config.resume.strict_environment:
        raise MnistFlaxError(
            f"resuming at step {step} in another environment than the checkpoint's ({listed}) with "
            "resume.strict_environment=True; resume where the checkpoint ran (its commit's uv.lock, installed by "
            "`make setup`; the same devices and cores), or pass --config.resume.strict_environment=False to resume "
            "with a warning"
        )
    if jax.process_index() == 0:
        print(f"warning: resuming in another environment than the checkpoint's ({listed})", flush=True)
