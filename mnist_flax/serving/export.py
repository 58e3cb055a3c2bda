"""A run's best model as a file that runs without this code base: ONNX (the default) or a `jax.export` program.

`export_run(RUN, fmt, out)` reads the finished run (records.runs), its best checkpoint (serving.trained), and
writes into `out` (default RUN/export/) the model file, model_card.json and model_card.md. Both formats hold one
function (`serving_function`: uint8 images -> preprocessing -> the model in evaluation -> softmax): `jax.export`
serializes it, jax2onnx converts it to ONNX (`onnx_model`), so every registered model exports. Everything is
built in memory first and written to a temporary folder beside `out`, renamed to `out` at the end: a failed
export leaves nothing behind and changes nothing of the run. A run tracked in W&B (offline or online) then
logs the export as a `model-export` artifact of its own W&B run (`log_to_wandb`).
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import version as metadata_version

import numpy as np

from mnist_flax import layout
from mnist_flax.errors import CheckpointError, ConfigError, MnistFlaxError, WorkdirError, first_line
from mnist_flax.records import files, runs
from mnist_flax.serving import model_card

FORMATS = model_card.MODEL_FILES  # --format -> the model file
EXPORT_DIR = "export"  # RUN/export/: the default --out
ARTIFACT_TYPE = "model-export"
JAX_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # a jax.export program runs only on the platforms it was lowered for
# ONNX: opset 17 (onnxruntime 1.12 and later, most other runtimes), the input and output names, N symbolic.
ONNX_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT, ONNX_BATCH = "images", "probabilities", "N"
# The check before writing: onnxruntime against JAX on this many seeded uint8 images, probabilities within this.
CHECK_IMAGES = 8
CHECK_TOLERANCE = 1e-4


@dataclasses.dataclass
class Exported:
    """What an export wrote."""

    folder: str
    files: dict[str, int]  # file name -> bytes
    card: dict


def export_run(run: str, fmt: str = "onnx", out: str | None = None) -> Exported:
    """Writes the run's best model in `fmt` with its model card into `out` (default RUN/export/).

    Raises:
      MnistFlaxError: an unknown format, a run that is not a finished workdir or has no checkpoint of its best
        model, an `out` that exists and is not an empty folder, a workdir a training is writing to.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    record = runs.load(run, history=False, predictions=False)
    if record.source != "workdir":
        raise ConfigError(f"{run} is a W&B run, not a run workdir: export reads the checkpoints of a workdir")
    out = os.path.abspath(out or os.path.join(record.path, EXPORT_DIR))
    _check_out(out)
    if not record.finished:
        why = f": {record.stopped['reason']}" if record.stopped and record.stopped.get("reason") else ""
        raise CheckpointError(
            f"run {record.path} did not finish ({record.status}{why}); only a finished run has a best model to export"
        )
    from mnist_flax.serving import trained  # JAX: loaded only here (predict imports this module without it)

    with _no_training(record.path):
        model = trained.from_run(record.path)
        payload, details = _serialize(model, fmt, record)
        provenance = files.read_json(os.path.join(record.path, layout.PROVENANCE), {})
        config = files.read_json(os.path.join(record.path, layout.CONFIG))
        sizes = {FORMATS[fmt]: len(payload)}
        card = model_card.build(
            record, model, provenance, config, {"name": fmt, "file": FORMATS[fmt], **details}, sizes
        )
        # The shapes of the file written: the model's image shape, one probability per class.
        card["input"] = {**card["input"], "shape": [ONNX_BATCH, *model.image_shape]}
        card["output"] = {**card["output"], "shape": [ONNX_BATCH, len(model.class_names)]}
        contents = {
            FORMATS[fmt]: payload,
            model_card.JSON_NAME: json.dumps(card, indent=2, sort_keys=True, default=str).encode(),
            model_card.MARKDOWN_NAME: model_card.markdown(card).encode(),
        }
        _write_folder(out, contents)
        return Exported(out, {name: len(data) for name, data in contents.items()}, card)


def _check_out(out: str) -> None:
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        what = "is not empty" if os.path.isdir(out) else "is not a folder"
        raise WorkdirError(f"--out {out} exists and {what}; name a new folder, or remove it")


@contextlib.contextmanager
def _no_training(workdir: str):
    """Holds a shared lock on the workdir's `.lock` (never writing it): refuses while a training holds the
    workdir, and keeps one from starting there until the export is done."""
    path = os.path.join(workdir, layout.LOCK)
    if not os.path.exists(path):
        yield
        return
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(
                f"workdir {workdir} is in use by a running training; export it once it finished"
            ) from None
        yield


def _serialize(model, fmt: str, record) -> tuple[bytes, dict]:
    """(the model file's bytes, what the model card says of the format) of a serving.trained.TrainedModel."""
    if fmt == "onnx":
        metadata = {
            "class_names": model.class_names,
            "data_set": model.data_name,
            "run": record.path,
            "checkpoint_step": str(model.step),
            "git_commit": record.git.get("commit", ""),
        }
        return onnx_model(model, metadata)
    import jax
    from jax import export

    (batch,) = export.symbolic_shape("N")
    images = jax.ShapeDtypeStruct((batch, *model.image_shape), "uint8")
    try:
        program = export.export(jax.jit(serving_function(model)), platforms=JAX_PLATFORMS)(images)
    except Exception as e:  # e.g. a model that calls back into Python: no serialized program holds that
        name = model.model_config["name"]
        raise ConfigError(f"export --format jax: JAX cannot export the {name} model: {first_line(e)}") from None
    details = {
        "platforms": list(program.platforms),
        "calling_convention_version": program.calling_convention_version,
        # jax.export's compatibility policy: newer JAX releases read it for at least six months.
        "runtime": f"jax.export.deserialize, JAX {jax.__version__} or a release of the six months after it",
    }
    return bytes(program.serialize()), details


def serving_function(model) -> Callable:
    """What every format holds: uint8 images [N, height, width, channels] -> class probabilities [N, classes],
    the model's variables (parameters, batch statistics) closed over as constants."""
    probabilities, variables = model.probabilities_fn(), model.variables
    return lambda images: probabilities(variables, images)


def onnx_model(model, metadata: dict) -> tuple[bytes, dict]:
    """The ONNX file of a TrainedModel, converted by jax2onnx from `serving_function`, and the card's format entry.

    The conversion is checked before anything is written: onnx's full checker, then onnxruntime against JAX on
    a few seeded images (their largest probability difference goes into the card).

    Raises:
      ConfigError: jax2onnx cannot convert the model, or its ONNX does not compute what JAX does.
    """
    import jax
    import onnx
    import onnxruntime

    try:
        import jax2onnx
    except ImportError as e:  # an environment not made from uv.lock
        raise ConfigError(
            f"export --format onnx needs jax2onnx ({e}); make setup installs it from uv.lock (pip: requirements.txt)"
        ) from None
    name = model.model_config["name"]
    version = metadata_version("jax2onnx")
    refused = f"export --format onnx: jax2onnx {version} cannot convert the {name} model"
    function = serving_function(model)
    images = jax.ShapeDtypeStruct((ONNX_BATCH, *model.image_shape), np.uint8)
    try:
        with _quiet_converter(), flax_pooling_signatures():
            proto = jax2onnx.to_onnx(
                function,
                [images],
                model_name=f"mnist_flax_{name}",
                opset=ONNX_OPSET,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
            )
        # jax2onnx records some intermediate shapes in JAX's channel-last order where its graph holds them
        # channel-first (after a BatchNorm); they are hints only, and wrong ones fail the checker and make
        # onnxruntime warn, so the graph goes without them: every runtime infers them again.
        del proto.graph.value_info[:]
        onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        proto.doc_string = (
            f"uint8 images [N, {', '.join(map(str, model.image_shape))}] (0-255, as the data set holds them) -> "
            f"class probabilities [N, {len(model.class_names)}]"
        )
        onnx.checker.check_model(proto, full_check=True)
        payload = proto.SerializeToString()
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        session = onnxruntime.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
        sample = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, *model.image_shape), dtype=np.uint8)
        difference = float(
            np.abs(session.run(None, {ONNX_INPUT: sample})[0] - np.asarray(jax.jit(function)(sample))).max()
        )
    except Exception as e:  # the converter's or a runtime's own error, on a model of the user's
        raise ConfigError(f"{refused}: {first_line(e)} (--format jax writes JAX's own program instead)") from None
    if not difference <= CHECK_TOLERANCE:
        raise ConfigError(
            f"{refused}: onnxruntime's probabilities differ from JAX's by {difference:.2g} (above {CHECK_TOLERANCE:g}) "
            "on seeded images; --format jax writes JAX's own program instead"
        )
    details = {
        "opset": ONNX_OPSET,
        "ir_version": proto.ir_version,
        "converter": f"jax2onnx {version}",
        "checked": {
            "images": CHECK_IMAGES,
            "max_abs_difference": difference,
            "runtime": f"onnxruntime {onnxruntime.__version__}",
        },
        "runtime": "onnxruntime or any ONNX runtime",
    }
    return payload, details


# jax2onnx (0.17.1) replaces flax.linen's pooling functions while it traces with its own, which take `window_shape`
# by keyword only: `nn.max_pool(x, (2, 2))`, flax's own signature, fails to convert. (plugin module, class, the
# class's patch factory, the flax function whose signature the patch must accept; flax 0.12 has no min_pool)
_POOLING_PATCHES = (
    ("jax2onnx.plugins.flax.linen.max_pool", "MaxPoolPlugin", "_make_patch", "max_pool"),
    ("jax2onnx.plugins.flax.linen.min_pool", "MinPoolPlugin", "_make_patch", "min_pool"),
    ("jax2onnx.plugins.flax.linen.avg_pool", "AvgPoolPlugin", "get_monkey_patch", "avg_pool"),
)


@contextlib.contextmanager
def flax_pooling_signatures():
    """While it is active, jax2onnx's replacements of flax.linen's max_pool, min_pool and avg_pool take their
    arguments as flax's functions do (positional `window_shape` included): each call is bound by the flax
    function's signature and passed on by keyword. A plugin jax2onnx no longer has is left as it is."""
    import importlib
    import inspect

    import flax.linen

    replaced = []
    for module_name, class_name, factory_name, function_name in _POOLING_PATCHES:
        try:
            plugin = getattr(importlib.import_module(module_name), class_name)
            function = getattr(flax.linen, function_name)
        except (ImportError, AttributeError):  # a plugin or a function of another version
            continue
        if factory_name not in vars(plugin):
            continue
        original = vars(plugin)[factory_name]
        factory = getattr(plugin, factory_name)
        signature = inspect.signature(function)

        def make(orig, factory=factory, signature=signature):
            patched = factory(orig)

            def pool(*args, **kwargs):
                arguments = signature.bind(*args, **kwargs).arguments
                return patched(arguments.pop("inputs"), **arguments)

            return pool

        setattr(plugin, factory_name, staticmethod(make))
        replaced.append((plugin, factory_name, original))
    try:
        yield
    finally:
        for plugin, factory_name, original in replaced:
            setattr(plugin, factory_name, original)


@contextlib.contextmanager
def _quiet_converter():
    """jax2onnx and onnx_ir log warnings of their own graph bookkeeping (a value whose type they did not record):
    not the user's to act on, so below the export's output."""
    loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _write_folder(out: str, contents: dict[str, bytes]) -> None:
    """Writes the files into a temporary folder beside `out`, then renames it to `out`; on failure, nothing."""
    parent = os.path.dirname(out)
    made = []  # the parents this export creates, removed again on failure
    probe = parent
    while not os.path.exists(probe):
        made.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    except OSError as e:
        raise WorkdirError(f"cannot write the export beside {out}: {e.strerror}") from None
    try:
        for name, data in contents.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
        os.chmod(staging, 0o755)  # mkdtemp's folder is private; the export is not
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked): replaced by the staged folder
        os.rename(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise WorkdirError(f"writing the export to {out} failed: {e.strerror or e}") from None


# ---------------------------------------------------------------- W&B


def log_to_wandb(exported: Exported, run: str, fmt: str) -> dict | None:
    """Logs the export as a `model-export` artifact of the run's own W&B run; None if the run has none.

    The run is resumed by its id (RUN/wandb_run_id) in its own project, in the mode it ran in: online when it
    ran online and a key is here, else offline, which adds one `offline-run-*` folder to RUN/wandb/ (the
    artifact's record; `python -m mnist_flax sync RUN` uploads it after the run's own). The segment's W&B
    config holds the run's git state, as the training's segments do, so `sync` treats it like them.
    """
    from mnist_flax.tracking import wandb_run

    record = runs.load(run, history=False, predictions=False)
    mode = ((record.final or {}).get("wandb") or {}).get("mode")
    if not record.wandb_id or mode in (None, "disabled") or os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return None
    mode = "online" if mode == "online" and wandb_run.read_token() else "offline"
    import wandb

    wandb_config = files.read_json(os.path.join(record.path, layout.CONFIG)).get("wandb") or {}
    init = dict(
        id=record.wandb_id,
        resume="allow",
        dir=record.path,
        project=wandb_config.get("project") or None,
        entity=wandb_config.get("entity") or None,
        config={f"{layout.WANDB_GIT_PREFIX}{k}": v for k, v in record.git.items()},
        settings=wandb.Settings(
            silent=True,
            console="off",
            save_code=False,
            disable_git=True,
            init_timeout=float(wandb_config.get("init_timeout", 60.0)),
        ),
    )
    try:
        session = wandb.init(mode=mode, **init)
    except Exception as e:  # online but unreachable: the offline segment uploads with the run's own
        if mode != "online":
            raise MnistFlaxError(f"W&B could not start an offline run: {first_line(e)}") from None
        wandb.teardown()
        mode, session = "offline", wandb.init(mode="offline", **init)
    name = f"export-{record.wandb_id}"
    summary = {k: exported.card[k] for k in ("format", "input", "output", "class_names", "files")}
    summary.update(
        checkpoint_step=exported.card["model"]["checkpoint_step"],
        git_commit=exported.card["git"].get("commit"),
        data=exported.card["data"]["name"],
        test_accuracy=(exported.card["metrics"].get("test") or {}).get("accuracy"),
    )
    artifact = wandb.Artifact(name, type=ARTIFACT_TYPE, metadata=summary)
    for file_name in exported.files:  # file by file: add_dir prints a line of its own
        artifact.add_file(os.path.join(exported.folder, file_name), name=file_name)
    session.log_artifact(artifact, aliases=["latest", fmt])
    folder = os.path.dirname(session.dir) if mode == "offline" else None
    session.finish()
    return {"name": name, "type": ARTIFACT_TYPE, "mode": mode, "run_id": record.wandb_id, "folder": folder}
