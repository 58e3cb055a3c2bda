"""Tables from the sections' results: printed by run.py and written to benchmarks/RESULTS.md."""

import os

from benchmarks.common import fmt, format_table
from benchmarks.sections import SECTIONS, THREADS

NOTES_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")  # the analysis, by hand


def render_throughput(result: dict) -> str:
    header = ["model", "batch", "contender", "images/s", "vs PyTorch", "vs host-fed", "spread", "cores", "compile s"]
    rows = [
        [
            r["model"],
            r["batch_size"],
            r["label"],
            fmt(r["images_per_second"]),
            fmt(r["vs_torch"], 2, "x"),
            fmt(r["vs_hostfed"], 2, "x"),
            fmt(100 * r["spread"], 0, "%"),
            fmt(r["cpu_per_wall"], 2),
            fmt(r["compile_train_seconds"], 1) if r["compile_train_seconds"] is not None else "-",
        ]
        for r in result["rows"]
    ]
    parts = [format_table(header, rows, "lllrrrrrr")]
    eval_rows = []
    for r in result["eval_rows"]:
        eval_rows.append(
            [
                r["model"],
                r["label"],
                fmt(r["seconds"], 2),
                fmt(result["num_eval_images"] / r["seconds"]),
                fmt(r["vs_torch"], 2, "x"),
            ]
        )
        if "report_seconds" in r:
            eval_rows.append(
                [r["model"], "  ... `steps.evaluate` (with the full report)", fmt(r["report_seconds"], 2), "-", "-"]
            )
    parts += [
        "",
        f"Evaluation of the {result['num_eval_images']:,} test images (batches of 1,000; `vs PyTorch` > 1 is faster):",
        "",
        format_table(["model", "contender", "seconds", "images/s", "vs PyTorch"], eval_rows, "llrrr"),
    ]
    t = result["threads1"]
    parts += [
        "",
        f"Control, one thread each: a child process pinned to core {t['cores']}, `torch.set_num_threads(1)`; "
        "the same data, models and round lengths:",
        "",
        format_table(
            ["model", "batch", "contender", "images/s", "vs PyTorch", "cores"],
            [
                [
                    r["model"],
                    r["batch_size"],
                    r["label"],
                    fmt(r["images_per_second"]),
                    fmt(r["vs_base"], 2, "x"),
                    fmt(r["cpu_per_wall"], 2),
                ]
                for r in t["rows"]
            ],
            "lllrrr",
        ),
    ]
    return "\n".join(parts)


def render_memory(result: dict) -> str:
    header = ["model", "batch", "contender", "peak RSS MiB", "RSS after setup MiB", "RSS at start MiB"]
    rows = [
        [
            r["model"],
            r["batch_size"],
            r["label"],
            fmt(r["peak_rss_mb"]),
            fmt(r["rss_after_setup_mb"]),
            fmt(r["rss_start_mb"]),
        ]
        for r in result["rows"]
    ]
    return format_table(header, rows, "lllrrr")


def render_cnn_cpu(result: dict) -> str:
    def table(rows, base_name, extra_header=(), extra=lambda r: []):
        return format_table(
            ["variant", "images/s", f"vs {base_name}", "cores", *extra_header],
            [
                [
                    r["label"],
                    fmt(r["images_per_second"]),
                    fmt(r["vs_base"], 2, "x"),
                    fmt(r["cpu_per_wall"], 2),
                    *extra(r),
                ]
                for r in rows
            ],
            "lrrr" + "r" * len(extra_header),
        )

    formulations = result["formulations"]
    parts = [
        "Formulations of the same model (same parameters; max |logit difference| from the first), batch 128, "
        "1 step/call, interleaved:",
        "",
        table(
            formulations,
            formulations[0]["label"],
            ("max abs logit diff", "compile s"),
            lambda r: [f"{r['max_abs_logit_diff']:.1e}", fmt(r["compile_seconds"], 1)],
        ),
        "",
        "The batch split into pieces for the convolutions (`model.conv_batch_split`) and steps fused without a loop "
        "(`train.steps_per_call`, `train.scan_unroll` = all), conv=xla, batch 128, interleaved; `compile s` = the "
        "train step's:",
        "",
        table(
            result["fused"],
            result["fused"][0]["label"],
            ("compile s",),
            lambda r: [fmt(r.get("compile_train_seconds", r["compile_seconds"]), 1)],
        ),
        "",
        "Batch size (conv=xla on the whole batch, 1 step/call, the same number of images a round), interleaved:",
        "",
        table(result["batch_sizes"], "batch 128") if result["batch_sizes"] else "(not measured in this run)",
    ]
    if result["xla_flags"]:
        parts += [
            "",
            "XLA flags (a child process each, in turn; CNN batch 128, images/s):",
            "",
            format_table(
                ["XLA_FLAGS", "conv=xla", "conv=shifted_matmul", "xla / shifted"],
                [
                    [
                        f["xla_flags"],
                        fmt(f["xla"]["images_per_second"]),
                        fmt(f["shifted_matmul"]["images_per_second"]),
                        fmt(f["xla"]["images_per_second"] / f["shifted_matmul"]["images_per_second"], 2, "x"),
                    ]
                    for f in result["xla_flags"]
                ],
                "lrrr",
            ),
        ]
    return "\n".join(parts)


def render_scaling(result: dict) -> str:
    rows = [
        [
            r["num_devices"],
            r["pieces"],
            r["steps_per_call"],
            fmt(r["images_per_second"]),
            fmt(r["vs_one_device"], 2, "x"),
            fmt(100 * r["spread"], 0, "%"),
            fmt(r["cpu_per_wall"], 2),
            fmt(r["compile_seconds"], 1),
            f"{r['max_log_prob_diff']:.1e}",
        ]
        for r in result["rows"]
    ]
    header = ["devices", "pieces/device", "steps/call", "images/s", "vs 1 device", "spread", "cores", "compile s"]
    return format_table([*header, "max abs log-prob diff"], rows, "rrrrrrrrr")


def render_overhead(result: dict) -> str:
    d = result["default_run"]
    tw, vw, ck = result["train_writes"], result["val_writes"], result["checkpoint"]
    rows = [
        [
            "write_scalars, train log (5 scalars)",
            fmt(tw["blocked_ms_mean"], 2),
            fmt(tw["cpu_ms_per_call"], 2),
            f"{d['train_writes_per_epoch']}/epoch",
        ],
        [
            f"write_scalars, validation ({vw['num_scalars']} scalars)",
            fmt(vw["blocked_ms_mean"], 2),
            fmt(vw["cpu_ms_per_call"], 2),
            "1/epoch",
        ],
        ["Checkpoints.save (async)", fmt(ck["blocked_ms_median"], 1), fmt(ck["cpu_ms_per_save"], 1), "1/epoch"],
        ["  ... until written (wait)", fmt(ck["until_written_ms_median"], 1), "-", "-"],
        ["  ... W&B model artifact (upload_to_wandb)", fmt(ck["wandb_artifact_ms_median"], 1), "-", "1/epoch"],
    ]
    table = format_table(["what", "ms blocked per call", "CPU ms per call", "default run"], rows, "lrrr")
    ab = result["ab"]
    lines = [
        table,
        "",
        f"Default CNN run: {d['steps_per_epoch']} steps/epoch at {d['step_ms']:.0f} ms = {d['epoch_seconds']:.0f} s "
        f"an epoch ({d['cores_busy_training']:.2f} cores busy). Writers + checkpoint per epoch: "
        f"**{100 * d['blocked_share']:.3f}%** of the epoch blocked in the loop "
        f"(writers {100 * d['blocked_share_writers']:.3f}%, checkpoint {100 * d['blocked_share_checkpoint']:.3f}%), "
        f"**{100 * d['cpu_share']:.3f}%** of its CPU time.",
        f"The library's `_save` also waits for the save and logs a W&B artifact when `checkpoint.upload_to_wandb` "
        f"is on (the default) and a W&B run exists: {100 * (d['wait_share'] + d['artifact_share']):.2f}% of an epoch.",
        "",
        f"A/B, interleaved ({result['ab_steps']} steps a round; writes every {result['ab_log_every']} steps and one "
        f"save a round, then scaled to the default run; the bare rounds spread {100 * result['ab_bare_spread']:.0f}%):",
        "",
        format_table(
            ["variant", "extra time, amplified", "amplification", "scaled to a default run"],
            [
                [
                    name,
                    fmt(100 * v["extra_share_amplified"], 1, "%"),
                    fmt(v["amplification"], 1, "x"),
                    fmt(100 * v["extra_share_default_run"], 2, "%"),
                ]
                for name, v in ab.items()
            ],
            "lrrr",
        ),
    ]
    return "\n".join(lines)


def render_time_to_90(result: dict) -> str:
    head = (
        f"{'reached' if result['reached'] else 'NOT reached'} 90% test accuracy after **{result['epochs']} epoch(s)**, "
        f"**{result['train_seconds']:.0f} s** of training (compile {result['compile_seconds']:.1f} s and evaluation "
        f"{result['eval_seconds']:.1f} s apart; {result['wall_seconds']:.0f} s wall in all); batch "
        f"{result['batch_size']}, conv={result['conv_impl']} on {result.get('pieces', 1)} piece(s), "
        f"{result['steps_per_call']} step(s)/call."
        + (" QUICK: 1 epoch on 6,400 examples, not the real figure." if result["quick"] else "")
    )
    table = format_table(
        ["epoch", "test accuracy", "training s (cumulative)"],
        [[e["epoch"], f"{e['test_accuracy']:.4f}", fmt(e["train_seconds"], 1)] for e in result["per_epoch"]],
        "rrr",
    )
    return head + "\n\n" + table


def render_accuracy(result: dict) -> str:
    table = format_table(
        ["seed", "test accuracy", "best validation accuracy", "best step", "training s"],
        [
            [
                r["seed"],
                f"{r['test_accuracy']:.4f}",
                f"{r['best_val_accuracy']:.4f}",
                r["best_step"],
                fmt(r["train_seconds"], 0),
            ]
            for r in result["runs"]
        ],
        "rrrrr",
    )
    return (
        f"Mean test accuracy after {result['epochs']} epochs: **{result['mean']:.4f}** (std {result['std']:.4f}, "
        f"{len(result['runs'])} seed(s))"
        + (" QUICK: 1 epoch on 5,000 examples." if result["quick"] else "")
        + "\n\n"
        + table
    )


RENDERERS = {
    "throughput": ("Training throughput (steady state, compile apart) and evaluation time", render_throughput),
    "memory": ("Peak memory (a fresh process per contender)", render_memory),
    "cnn_cpu": ("The CNN on XLA's CPU backend", render_cnn_cpu),
    "scaling": ("Data parallelism: 1, 2, 4, 8 simulated CPU devices", render_scaling),
    "overhead": ("Overheads: metric writers and checkpoints", render_overhead),
    "time_to_90": ("Time to 90% test accuracy (default CNN config)", render_time_to_90),
    "accuracy": ("Accuracy in budget (default CNN config, 10 epochs)", render_accuracy),
}

SECTION_NOTES = {
    "throughput": (
        "Median of the rounds; each ratio is the median of the round-by-round ratios. `spread` = (max - min) / median "
        "of the rounds; `cores` = process CPU seconds per wall second while the contender ran (2 = both cores); "
        "`compile s` = the train step's `lower().compile()` (the predict function is compiled apart)."
    ),
    "memory": (
        "Peak RSS (`VmHWM`) of a child process that imports only what its contender needs, loads the data (NumPy, "
        "from a cached .npz), builds and compiles the contender, trains a few steps and evaluates the test set; it "
        "counts the interpreter, the libraries, the data (uint8 on the device for ours, float32 on the host for the "
        "others) and XLA's or PyTorch's buffers."
    ),
    "scaling": (
        "The default CNN config at batch 128 in a child process per device count (`jax_num_cpu_devices`), the batch "
        "split over the devices by the library's mesh path; the counts alternate over two passes and each row is the "
        "median of its rounds. This machine has 2 cores, so more devices cannot be faster: the test is that it runs "
        "and agrees. Agreement: after the same 20 steps from the same start, the largest difference of any of "
        "1,000 test log-probabilities from the 1-device run (float32 sums in another order)."
    ),
    "time_to_90": (
        "This loop (the library's step, `epoch_order`, `make_predict`, no writers or checkpoints) evaluates the "
        "test set after every epoch and stops at the first epoch at or above 90%: the test set is used only as a "
        "stopwatch, never for model selection."
    ),
    "accuracy": (
        "`train.train_and_evaluate` as `make train` runs it (checkpoints, W&B and TensorBoard off): the test "
        "accuracy of the model selected on validation accuracy."
    ),
}


def targets(results: dict) -> list[list[str]]:
    """Issue 3's targets against what was measured."""
    rows = []
    throughput = results.get("throughput", {}).get("result")
    if throughput:
        for batch_size in sorted({r["batch_size"] for r in throughput["rows"]}):
            cnn = [r for r in throughput["rows"] if r["model"] == "cnn" and r["batch_size"] == batch_size]
            default = next((r for r in cnn if r.get("default")), None)
            best = max((r for r in cnn if r["kind"] == "ours"), key=lambda r: r["vs_torch"], default=None)
            if default:
                rows.append(
                    [
                        f"CNN vs PyTorch >= 1.0 (aim 1.5), batch {batch_size}",
                        f"default {default['vs_torch']:.2f}x; best ours {best['vs_torch']:.2f}x ({best['label']})",
                        "met"
                        if default["vs_torch"] >= 1.0
                        else ("met by a non-default setting" if best["vs_torch"] >= 1 else "missed"),
                    ]
                )
                rows.append(
                    [
                        f"CNN above the host-fed JAX loop, batch {batch_size}",
                        f"{default['vs_hostfed']:.2f}x",
                        "met" if default["vs_hostfed"] > 1.0 else "missed",
                    ]
                )
        compiles = [
            r
            for r in throughput["rows"]
            if r.get("default") and r["batch_size"] == min(x["batch_size"] for x in throughput["rows"])
        ]
        for r in compiles:
            total = r["compile_train_seconds"] + r["compile_predict_seconds"]
            rows.append(
                [
                    f"compile < 5 s ({r['model']}: train step + predict)",
                    f"{total:.1f} s",
                    "met" if total < 5 else "missed",
                ]
            )
    if throughput and throughput.get("threads1"):
        for r in throughput["threads1"]["rows"]:
            if r["model"] == "cnn" and "(default)" in r["label"]:
                rows.append(
                    [
                        f"CNN vs PyTorch at 1 thread each (control), batch {r['batch_size']}",
                        f"{r['vs_base']:.2f}x ({r['label']})",
                        "met" if r["vs_base"] >= 1.0 else "missed",
                    ]
                )
    scaling = results.get("scaling", {}).get("result")
    if scaling:
        worst = max(r["max_log_prob_diff"] for r in scaling["rows"])
        counts = ", ".join(str(r["num_devices"]) for r in scaling["rows"])
        rows.append(
            [
                f"runs and agrees on {counts} simulated devices",
                f"max abs log-prob difference {worst:.1e}; "
                + ", ".join(f"{r['vs_one_device']:.2f}x" for r in scaling["rows"])
                + " the 1-device throughput",
                "met" if worst < 1e-3 else "missed",
            ]
        )
    overhead = results.get("overhead", {}).get("result")
    if overhead:
        d = overhead["default_run"]
        ab = sum(max(0.0, v["extra_share_default_run"]) for v in overhead["ab"].values())
        share = max(d["blocked_share"], d["cpu_share"], ab)
        rows.append(
            [
                "logging + checkpointing < 2% of training time",
                f"{100 * d['blocked_share']:.3f}% blocked, {100 * d['cpu_share']:.3f}% of CPU, {100 * ab:.2f}% by A/B",
                "met" if share < 0.02 else "missed",
            ]
        )
    accuracy = results.get("accuracy", {}).get("result")
    if accuracy and not accuracy["quick"]:
        rows.append(
            [
                "default CNN >= 93% test accuracy in 10 epochs (mean of 3 seeds)",
                f"{100 * accuracy['mean']:.2f}% (std {100 * accuracy['std']:.2f})",
                "met" if accuracy["mean"] >= 0.93 else "missed",
            ]
        )
    else:
        rows.append(
            ["default CNN >= 93% test accuracy in 10 epochs (mean of 3 seeds)", "not run (`--only accuracy`)", "-"]
        )
    t90 = results.get("time_to_90", {}).get("result")
    if t90 and not t90["quick"]:
        rows.append(
            [
                "time to 90% test accuracy (reported, no target on CPU)",
                f"{t90['epochs']} epoch(s), {t90['train_seconds']:.0f} s of training",
                "-",
            ]
        )
    return rows


def render_markdown(results: dict) -> str:
    meta = results.get("_meta", {})
    machine, versions = meta.get("machine", {}), meta.get("versions", {})
    lines = [
        "# Benchmarks",
        "",
        "Written by `python benchmarks/run.py` (`make bench`); every figure below comes from the section's run, whose "
        "date, command and load average are given with it. Do not edit by hand: rerun.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores ({machine.get('cores_usable')} usable), "
        f"{machine.get('memory_gib')} GiB; {machine.get('platform')}",
        f"- Python {machine.get('python')}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Threads: `torch.set_num_threads({THREADS})`; XLA's CPU client sizes its thread pool from the process's "
        f"CPU affinity ({machine.get('cores_usable')} cores), so both may use {THREADS}. The `cores` columns show the "
        "CPU seconds each actually used per wall second; the 1-thread control pins a child process to one core and "
        "sets `torch.set_num_threads(1)`.",
        f"- XLA_FLAGS: `{machine.get('xla_flags') or '(none)'}`",
        "- The machine is shared with other engineers' jobs; each section gives the load average before and after "
        "it. Absolute figures move with the load; the ratios, taken round by round between interleaved contenders, "
        "are the figures to read. A busy machine is not neutral, though: PyTorch's two OpenMP threads lose far more "
        "than XLA when another job takes a core (see the notes), so compare runs at a similar load.",
        "",
        "## Targets (issue 3)",
        "",
        format_table(["target", "measured", "status"], targets(results), "lll"),
        "",
    ]
    for name in SECTIONS:
        entry = results.get(name)
        if not entry:
            continue
        title, renderer = RENDERERS[name]
        lines += [
            f"## {title}",
            "",
            f"`{entry['command']}` on {entry['date']}, {entry['minutes']:.1f} min; load average "
            f"{entry['load_before']} before, {entry['load_after']} after.",
            "",
        ]
        if name in SECTION_NOTES:
            lines += [SECTION_NOTES[name], ""]
        lines += [renderer(entry["result"]), ""]
    if os.path.exists(NOTES_MD):
        with open(NOTES_MD) as f:
            lines += ["## Notes (written by hand, from these figures)", "", f.read().strip(), ""]
    return "\n".join(lines)
