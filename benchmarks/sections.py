"""The benchmark sections that train and time contenders, and the child processes some of them start.

Each section is fn(data, settings, data_path) -> a JSON-ready dict; `report.py` renders it. Child processes
(children.py) measure what needs a fresh process: peak memory, XLA flags, thread pinning, two CPU devices.
"""

import dataclasses
import shutil
import tempfile
import time

from benchmarks import common
from benchmarks.children import run_child
from benchmarks.common import median

SECTIONS = ("throughput", "memory", "cnn_cpu", "scaling", "overhead", "time_to_90", "accuracy")
DEFAULT_SECTIONS = SECTIONS[:-1]
THREADS = 2  # torch.set_num_threads; XLA's CPU client sizes its pool from the CPU affinity (2 cores here)


class Settings:
    """How long each section runs: the full benchmark, or a smoke run of the same code."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.rounds = 2 if quick else 3
        self.batch_sizes = (128,) if quick else (128, 512)
        # Images per contender per round: steps are a multiple of 10 so the fused contenders run whole calls.
        self.round_images = {"cnn": 1280 if quick else 5120, "mlp": 2560 if quick else 20480}
        self.fused_steps = 10
        self.eval_rounds = 1 if quick else 3
        self.memory_steps = 3 if quick else 5
        self.study_steps = 10 if quick else 20
        self.study_batch_sizes = () if quick else (32, 64, 128, 256)
        # (pieces, steps per call) of conv=xla at batch 128; rounds of split_round_steps steps.
        self.split_variants = (
            ((1, 1), (8, 3))
            if quick
            else ((1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (1, 3), (1, 10), (4, 3), (8, 2), (8, 3), (8, 5), (8, 10))
        )
        self.split_round_steps = 10 if quick else 30
        self.scaling_steps = 10 if quick else 40
        self.scaling_repeats = 1 if quick else 2
        self.xla_flag_sets = (
            ()
            if quick
            else (
                "",
                "--xla_cpu_use_xnnpack=true",
                "--xla_cpu_use_onednn=true",
                "--xla_cpu_enable_fast_math=true",
                "--xla_cpu_experimental_ynn_fusion_type=-reduce",
            )
        )
        self.writer_calls = 20 if quick else 200
        self.saves = 2 if quick else 4
        self.ab_steps = 10 if quick else 50
        self.ab_log_every = 5 if quick else 10


# ---------------------------------------------------------------- shared set-up


def architecture(config) -> dict:
    """The model's shapes, for the PyTorch twin."""
    return {
        "conv_features": tuple(config.model.get("conv_features", ())) if config.model.name == "cnn" else (),
        "dense_features": tuple(config.model.dense_features),
        "dropout_rate": float(config.model.dropout_rate),
    }


def round_steps(settings: Settings, model: str, batch_size: int) -> int:
    steps = max(1, settings.round_images[model] // batch_size)
    return max(settings.fused_steps, steps - steps % settings.fused_steps)


def default_conv_impl() -> str:
    from mnist_flax import models

    return models.resolve_conv_impl("auto")


def default_pieces(batch_size: int, num_devices: int = 1) -> int:
    from mnist_flax import models

    return models.resolve_conv_batch_split("auto", batch_size // num_devices)


def default_steps_per_call() -> int:
    import ml_collections

    from mnist_flax import steps

    return steps.resolve_steps_per_call(ml_collections.ConfigDict({"steps_per_call": "auto"}))


def cnn_label(impl: str, pieces: int, steps_per_call: int, unrolled: bool = True) -> str:
    """How one CNN contender runs, e.g. "conv=xla on 8 pieces, 5 steps/call"."""
    fused = "" if steps_per_call == 1 else (" unrolled" if unrolled else " in a scan")
    plural = lambda n: "s" * (n > 1)  # noqa: E731
    return f"conv={impl} on {pieces} piece{plural(pieces)}, {steps_per_call} step{plural(steps_per_call)}/call{fused}"


def ours_spec(impl: str | None, pieces: int | None, steps_per_call: int, *, unrolled: bool = True, default=False):
    """A spec of this project's loop with the CNN's knobs set (impl None: the MLP)."""
    overrides = {} if unrolled or steps_per_call == 1 else {"train.scan_unroll": "1"}
    if impl is not None:
        overrides |= {"model.conv_impl": impl, "model.conv_batch_split": str(pieces)}
        label = "ours " + cnn_label(impl, pieces, steps_per_call, unrolled)
    else:
        label = f"ours, {steps_per_call} step{'s' * (steps_per_call > 1)}/call"
    return {
        "kind": "ours",
        "conv_impl": impl,
        "steps_per_call": steps_per_call,
        "overrides": overrides,
        "default": default,
        "label": label + (" (default)" if default else ""),
    }


def contender_specs(model: str, settings: Settings, batch_size: int) -> list[dict]:
    """The contenders of one model: PyTorch, host-fed JAX, and this project's loop in its variants.

    The first is always PyTorch and the second the host-fed loop (the ratios' denominators); the third is this
    project's defaults. For the CNN, the default's two parts apart (the split batch, the fused steps), the
    plain jit step (whole batch, one step a call: what the Flax example's step does, with resident data) and
    the previous best (the shifted-matmul convolution, 10 steps in a scan).
    """
    specs = [{"kind": "torch", "label": "PyTorch (DataLoader + nn.Module)"}]
    spc = default_steps_per_call()
    if model == "cnn":
        impl, pieces = default_conv_impl(), default_pieces(batch_size)
        specs.append({"kind": "hostfed", "conv_impl": "xla", "label": "JAX host-fed (Flax example), conv=xla"})
        specs.append(ours_spec(impl, pieces, spc, default=True))
        specs.append(ours_spec("xla", 1, 1))
        if not settings.quick:
            specs.append(ours_spec(impl, pieces, 1))
            specs.append(ours_spec(impl, 1, spc))
            specs.append(ours_spec("shifted_matmul", 1, 10, unrolled=False))
    else:
        specs.append({"kind": "hostfed", "label": "JAX host-fed (Flax example)"})
        specs.append(ours_spec(None, None, spc, default=True))
        specs.append(ours_spec(None, None, 1))
    return specs


def build_contender(spec: dict, model: str, data, batch_size: int):
    """A contender object from its spec (imports torch or JAX only as needed)."""
    if spec["kind"] == "torch":
        from benchmarks.torch_loop import TorchContender

        return TorchContender(spec["architecture"], data, batch_size, threads=spec.get("threads", THREADS))
    from benchmarks import jax_loops

    overrides = {"model.conv_impl": spec["conv_impl"]} if spec.get("conv_impl") else {}
    config = jax_loops.model_config(model, **{**overrides, **spec.get("overrides", {})})
    if spec["kind"] == "hostfed":
        return jax_loops.HostFedContender(config, data, batch_size)
    return jax_loops.OursContender(config, data, batch_size, steps_per_call=spec.get("steps_per_call", 1))


def with_architecture(specs: list[dict], model: str) -> list[dict]:
    from benchmarks import jax_loops

    shapes = architecture(jax_loops.model_config(model))
    return [{**spec, "architecture": shapes} for spec in specs]


def warm_up(contender, spec) -> None:
    contender.run(2 * spec.get("steps_per_call", 1))


# ---------------------------------------------------------------- sections


def section_throughput(data, settings: Settings, data_path: str) -> dict:
    """Training images/s of every contender, interleaved, per model and batch size (compile apart); evaluation
    time of the 10,000 test images; and the same comparison at one thread each, in a child process."""
    rows, eval_rows = [], []
    for model in ("cnn", "mlp"):
        for batch_size in settings.batch_sizes:
            specs = with_architecture(contender_specs(model, settings, batch_size), model)
            contenders = {}
            for spec in specs:
                contender = build_contender(spec, model, data, batch_size)
                warm_up(contender, spec)
                contenders[spec["label"]] = (spec, contender)
            steps = round_steps(settings, model, batch_size)
            print(f"  {model} batch {batch_size}: {len(specs)} contenders x {settings.rounds} rounds x {steps} steps")
            timed = common.interleave(
                {
                    label: (lambda c=c, n=spec.get("round_steps", steps): c.run(n))
                    for label, (spec, c) in contenders.items()
                },
                settings.rounds,
            )
            torch_ips = timed[specs[0]["label"]].images_per_second()
            hostfed_ips = timed[specs[1]["label"]].images_per_second()
            for spec in specs:
                rounds = timed[spec["label"]]
                ips = rounds.images_per_second()
                contender = contenders[spec["label"]][1]
                rows.append(
                    {
                        "model": model,
                        "batch_size": batch_size,
                        "label": spec["label"],
                        "kind": spec["kind"],
                        "conv_impl": spec.get("conv_impl"),
                        "steps_per_call": spec.get("steps_per_call"),
                        "default": spec.get("default", False),
                        "images_per_second": rounds.median_images_per_second(),
                        "rounds_images_per_second": ips,
                        "spread": common.spread(ips),
                        "cpu_per_wall": rounds.cpu_per_wall(),
                        "vs_torch": median([a / b for a, b in zip(ips, torch_ips, strict=True)]),
                        "vs_hostfed": median([a / b for a, b in zip(ips, hostfed_ips, strict=True)]),
                        "compile_train_seconds": getattr(contender, "compile_train_seconds", None),
                        "compile_predict_seconds": getattr(contender, "compile_predict_seconds", None),
                        "loss": contender.last_loss,
                        "steps_per_round": spec.get("round_steps", steps),
                    }
                )
            if batch_size == settings.batch_sizes[0]:
                eval_rows += evaluation_rounds(model, specs, contenders, settings)
            del contenders
    print("  one thread each (child process)")
    threads1 = run_child(
        "threads1",
        {
            "batch_sizes": list(settings.batch_sizes),
            "round_images": settings.round_images,
            "rounds": settings.rounds,
            "quick": settings.quick,
        },
        data_path,
    )
    return {
        "rows": rows,
        "eval_rows": eval_rows,
        "num_eval_images": len(data.test_labels),
        "threads1": threads1,
        "rounds": settings.rounds,
        "threads": THREADS,
    }


def evaluation_rounds(model: str, specs: list[dict], contenders: dict, settings: Settings) -> list[dict]:
    """Seconds to evaluate the test set (batches of 1,000), interleaved: PyTorch, host-fed, this project's default.

    Every variant of ours evaluates the same way (`models.for_inference`: XLA's convolution on the whole batch).
    """
    specs = [s for s in specs if s["kind"] != "ours" or s.get("default")]
    results = {s["label"]: [] for s in specs}
    for spec in specs:  # the first call may allocate
        contenders[spec["label"]][1].evaluate()
    labels = list(results)
    for r in range(settings.eval_rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            results[label].append(contenders[label][1].evaluate()[0])
    torch_seconds = results[labels[0]]
    rows = []
    for spec in specs:
        row = {
            "model": model,
            "label": spec["label"],
            "default": spec.get("default", False),
            "seconds": median(results[spec["label"]]),
            "rounds_seconds": results[spec["label"]],
            "vs_torch": median([t / s for s, t in zip(results[spec["label"]], torch_seconds, strict=True)]),
        }
        if spec["kind"] == "ours" and spec.get("default"):
            row["report_seconds"] = contenders[spec["label"]][1].evaluate_report()[0]
        rows.append(row)
    return rows


def section_memory(data, settings: Settings, data_path: str) -> dict:
    """Peak RSS of a fresh process per contender: import, load data, build, compile, train, evaluate."""
    rows = []
    for model in ("cnn", "mlp"):
        for batch_size in settings.batch_sizes:
            specs = with_architecture(contender_specs(model, settings, batch_size), model)
            specs = [s for s in specs if s["kind"] != "ours" or s.get("default")]
            if settings.quick and model == "mlp":
                continue
            for spec in specs:
                child = {**spec, "model": model, "batch_size": batch_size, "steps": settings.memory_steps}
                result = run_child("memory", child, data_path)
                rows.append({"model": model, "batch_size": batch_size, "label": spec["label"], **result})
    return {"rows": rows, "steps": settings.memory_steps}


def section_cnn_cpu(data, settings: Settings, data_path: str) -> dict:
    """The CNN on XLA's CPU backend: conv and pooling formulations, batch size, XLA flags, 2 CPU devices."""
    from benchmarks import jax_loops
    from mnist_flax import steps as steps_lib

    config = jax_loops.model_config("cnn")
    variants = [("xla", "window"), ("xla", "reshape")]
    if not settings.quick:
        variants += [("shifted_matmul", "window"), ("xla_nchw", "window"), ("xla_nchw_grad", "window")]
        variants += [("shifted_matmul", "reshape")]
    contenders, checks = {}, {}
    reference = None
    for conv, pool in variants:
        label = f"conv={conv}, pool={pool}"
        contender = jax_loops.OursContender(config, data, 128, steps_per_call=1, model=jax_loops.StudyCNN(conv, pool))
        # Same parameters (the same seed gives the same tree), same outputs to float tolerance.
        images = steps_lib.preprocess(contender.train.images[:256])
        logits = contender.state.apply_fn({"params": contender.state.params}, images)
        reference = logits if reference is None else reference
        checks[label] = float(abs(logits - reference).max())
        contender.run(2)
        contenders[label] = contender
    steps = settings.study_steps
    timed = common.interleave({label: (lambda c=c: c.run(steps)) for label, c in contenders.items()}, settings.rounds)
    formulations = ratio_rows(timed, {label: {"compile_seconds": c.compile_seconds} for label, c in contenders.items()})
    for row in formulations:
        row["max_abs_logit_diff"] = checks[row["label"]]
    del contenders

    contenders = {}
    for batch_size in settings.study_batch_sizes:
        contenders[f"batch {batch_size}"] = jax_loops.OursContender(
            jax_loops.model_config("cnn", **{"model.conv_impl": "xla", "model.conv_batch_split": "1"}),
            data,
            batch_size,
            steps_per_call=1,
        )
        contenders[f"batch {batch_size}"].run(2)
    images = 128 * steps
    timed = common.interleave(
        {label: (lambda c=c: c.run(max(1, images // c.batch_size))) for label, c in contenders.items()},
        settings.rounds,
    )
    batch_sizes = ratio_rows(timed, {}, base="batch 128") if contenders else []
    del contenders

    # The batch split into pieces for the convolutions, and steps fused without a loop (conv=xla, batch 128).
    contenders = {}
    for pieces, steps_per_call in settings.split_variants:
        config = jax_loops.model_config("cnn", **{"model.conv_impl": "xla", "model.conv_batch_split": str(pieces)})
        label = cnn_label("xla", pieces, steps_per_call)
        contenders[label] = jax_loops.OursContender(config, data, 128, steps_per_call=steps_per_call)
        contenders[label].run(steps_per_call)
    fused_steps = settings.split_round_steps
    timed = common.interleave(
        {label: (lambda c=c: c.run(fused_steps)) for label, c in contenders.items()}, settings.rounds
    )
    fused = ratio_rows(
        timed,
        {
            label: {"compile_seconds": c.compile_seconds, "compile_train_seconds": c.compile_train_seconds}
            for label, c in contenders.items()
        },
    )
    del contenders

    flags = []
    for flag_set in settings.xla_flag_sets:
        print(f"  XLA_FLAGS={flag_set!r}")
        result = run_child("xla_flags", {"steps": steps, "rounds": 2}, data_path, xla_flags=flag_set)
        flags.append({"xla_flags": flag_set or "(none)", **result})
    return {
        "fused": fused,
        "formulations": formulations,
        "batch_sizes": batch_sizes,
        "xla_flags": flags,
        "steps": steps,
    }


def section_scaling(data, settings: Settings, data_path: str) -> dict:
    """The default CNN config on 1, 2, 4, 8 CPU devices (a child process each, `jax_num_cpu_devices`): images/s,
    and agreement after the same steps from the same start (max |log-probability difference| against 1 device)."""
    import numpy as np

    counts = (1, 2) if settings.quick else (1, 2, 4, 8)
    spec = {"steps": settings.scaling_steps, "rounds": settings.rounds, "agree_steps": 20, "agree_examples": 1000}
    runs = {}
    for repeat in range(settings.scaling_repeats):  # alternate the counts, so that load drifts hit each alike
        for num_devices in counts:
            print(f"  {num_devices} CPU device(s), pass {repeat + 1} (child process)")
            result = run_child("devices", {**spec, "num_devices": num_devices}, data_path)
            runs.setdefault(num_devices, []).append(result)
    reference = np.asarray(runs[1][0]["log_probs"])
    rows = []
    for num_devices, results in runs.items():
        ips = [ips for r in results for ips in r["rounds_images_per_second"]]
        rows.append(
            {
                "num_devices": num_devices,
                "images_per_second": median(ips),
                "spread": common.spread(ips),
                "cpu_per_wall": median([r["cpu_per_wall"] for r in results]),
                "compile_seconds": median([r["compile_seconds"] for r in results]),
                "pieces": results[0]["pieces"],
                "steps_per_call": results[0]["steps_per_call"],
                "max_log_prob_diff": max(float(np.abs(np.asarray(r["log_probs"]) - reference).max()) for r in results),
            }
        )
    base = rows[0]["images_per_second"]
    for row in rows:
        row["vs_one_device"] = row["images_per_second"] / base
    return {"rows": rows, **{k: v for k, v in spec.items() if k != "rounds"}, "rounds": settings.rounds}


def ratio_rows(timed: dict, extra: dict, base: str | None = None) -> list[dict]:
    """Median images/s of interleaved contenders and their round-by-round ratio to `base` (the first)."""
    base_ips = timed[base or next(iter(timed))].images_per_second()
    return [
        {
            "label": label,
            "images_per_second": rounds.median_images_per_second(),
            "rounds_images_per_second": rounds.images_per_second(),
            "vs_base": median([a / b for a, b in zip(rounds.images_per_second(), base_ips, strict=True)]),
            "cpu_per_wall": rounds.cpu_per_wall(),
            **extra.get(label, {}),
        }
        for label, rounds in timed.items()
    ]


def section_time_to_90(data, settings: Settings, data_path: str) -> dict:
    """Epochs and wall time of the default CNN config until test accuracy first reaches 90%."""
    from benchmarks import jax_loops

    config = jax_loops.model_config("cnn")
    if settings.quick:
        data = dataclasses.replace(data, train_images=data.train_images[:6400], train_labels=data.train_labels[:6400])
    wall_start = time.perf_counter()
    ours = jax_loops.OursContender(config, data)
    epochs, train_seconds, eval_seconds = [], 0.0, 0.0
    for epoch in range(1 if settings.quick else config.num_epochs):
        start = time.perf_counter()
        ours.run_epoch()
        train_seconds += time.perf_counter() - start
        seconds, accuracy = ours.evaluate()
        eval_seconds += seconds
        epochs.append({"epoch": epoch + 1, "test_accuracy": accuracy, "train_seconds": train_seconds})
        print(f"  epoch {epoch + 1}: test accuracy {accuracy:.4f} after {train_seconds:.1f} s of training", flush=True)
        if accuracy >= 0.90:
            break
    reached = epochs[-1]["test_accuracy"] >= 0.90
    return {
        "reached": reached,
        "epochs": len(epochs),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "compile_seconds": ours.compile_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "per_epoch": epochs,
        "batch_size": ours.batch_size,
        "conv_impl": ours.model.conv_impl,
        "pieces": ours.model.conv_batch_split,
        "steps_per_call": ours.steps_per_call,
        "quick": settings.quick,
    }


def section_accuracy(data, settings: Settings, data_path: str) -> dict:
    """`train.train_and_evaluate` on the default CNN config, 3 seeds: test accuracy of the validation-best model."""
    from benchmarks import jax_loops
    from mnist_flax import train

    seeds = (0,) if settings.quick else (0, 1, 2)
    runs = []
    for seed in seeds:
        config = jax_loops.model_config(
            "cnn",
            seed=seed,
            **{"checkpoint.enabled": False, "wandb.mode": "disabled", "tensorboard": False},
        )
        if settings.quick:
            config.num_epochs, config.data.train_subset = 1, 5000
        workdir = tempfile.mkdtemp(prefix=f"mnist_flax_accuracy_{seed}_")
        start = time.perf_counter()
        report = train.train_and_evaluate(config, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        runs.append(
            {
                "seed": seed,
                "test_accuracy": report["test"]["accuracy"],
                "best_val_accuracy": report["best_validation"]["val_accuracy"],
                "best_step": report["best_validation"]["step"],
                "seconds": time.perf_counter() - start,
                "train_seconds": report["seconds"],
            }
        )
    accuracies = [r["test_accuracy"] for r in runs]
    mean = sum(accuracies) / len(accuracies)
    std = (sum((a - mean) ** 2 for a in accuracies) / max(1, len(accuracies) - 1)) ** 0.5
    return {"runs": runs, "mean": mean, "std": std, "epochs": 1 if settings.quick else 10, "quick": settings.quick}
