"""Compare runs side by side: `python -m mnist_flax compare RUN... [--sort FIELD] [--json] [--html FILE]`.

Each RUN is a workdir, a sweep root (all its members, in the sweep's order), an
offline W&B run folder or a W&B run path (`entity/project/run_id`, needs a
key), read through the one Run record (`mnist_flax.records.runs`). One table: a row per
run with its status, the config fields that differ between the runs (the
configs as requested, so "auto" fields are not told apart by what each machine
resolved; `--resolved` compares the configs they trained with), best
validation accuracy and its step, test accuracy, macro F1 and AUROC, training
time, steps, and the git commit (`-dirty` when the tree was). Runs that stopped
early or failed are rows too, with their reason under the table. `--html FILE`
writes one self-contained page: the table, overlaid learning curves, each
run's confusion matrix and the config difference, the images inline.

Exit status: 0 when every reference was read; 2 for bad input, one `error:`
line for each reference that is no run or cannot be read (the others are still
compared, and a last line says how many were left out).
"""

import argparse
import base64
import datetime
import html
import io
import json
import os
import sys

from mnist_flax import layout
from mnist_flax.config import diff
from mnist_flax.errors import ConfigError, MnistFlaxError
from mnist_flax.records import runs

# Overrides a sweep adds to every trial; they differ by design, so the table leaves them out.
RUNNER_FIELDS = ("wandb.name", "wandb.group")
ABSENT = diff.ABSENT
# The columns after the config fields: row key -> header.
METRICS = {
    "best_val_accuracy": "best val acc",
    "best_val_step": "at step",
    "test_accuracy": "test acc",
    "f1_macro": "test F1",
    "auroc_macro": "test AUROC",
    "seconds": "time (s)",
    "steps": "steps",
}
HIGHER_IS_BETTER = ("best_val_accuracy", "test_accuracy", "f1_macro", "auroc_macro")
SOURCES = {"workdir": "workdir", "wandb_offline": "W&B offline", "wandb_online": "W&B"}
CURVES = (("train/loss", "train loss"), ("val/loss", "validation loss"), ("val/accuracy", "validation accuracy"))

# ---------------------------------------------------------------- reading


def gather(references: list[str], *, predictions: bool = False) -> tuple[list[runs.RunRecord], list[str]]:
    """The runs the references name (a sweep root: each member), and one message per reference that failed."""
    records, errors = [], []
    for reference in references:
        path = os.path.expanduser(reference)
        sweep = runs.is_sweep_root(path)
        try:
            members = runs.sweep_members(path) if sweep else [reference]
        except MnistFlaxError as e:
            errors.append(str(e))
            continue
        for member in members:
            try:
                records.append(
                    _load_member(member, predictions) if sweep else runs.load(member, predictions=predictions)
                )
            except MnistFlaxError as e:
                errors.append(f"{e} (a member of the sweep {path})" if sweep else str(e))
    return records, errors


def _load_member(workdir: str, predictions: bool) -> runs.RunRecord:
    """A sweep member's record; one that never wrote its config is a row all the same (failed or not started)."""
    if os.path.isfile(os.path.join(workdir, layout.CONFIG)):
        return runs.load(workdir, predictions=predictions)
    error = _last_error_line(os.path.join(workdir, layout.SWEEP_LOG))
    status, reason = ("failed", f"before training: {error}") if error else ("incomplete", "not started")
    nothing = {"config": {}, "requested_config": {}, "config_changes": {}, "history": [], "git": {}}
    nothing.update(final=None, predictions=None, wandb_id=None, stopped={"status": status, "reason": reason})
    return runs.RunRecord(name=os.path.basename(workdir), source="workdir", path=workdir, status=status, **nothing)


def _last_error_line(log_path: str) -> str | None:
    if not os.path.isfile(log_path):
        return None
    with open(log_path, errors="replace") as f:
        errors = [line.strip() for line in f if line.startswith("error:")]
    return errors[-1] if errors else None


# ---------------------------------------------------------------- the table


def differing_fields(configs: list[dict]) -> list[str]:
    """The fields whose values are not equal in every config (empty configs, runs never started, left out)."""
    return [name for name in diff.differing_keys(*(c for c in configs if c)) if name not in RUNNER_FIELDS]


def build_rows(records: list[runs.RunRecord], resolved: bool = False) -> tuple[list[str], list[dict]]:
    """The differing fields, and one row per run: name, status, those fields' values, metrics and git state."""
    configs = [record.config if resolved else record.requested_config for record in records]
    fields = differing_fields(configs)
    rows = []
    for record, config, label in zip(records, configs, _labels(records), strict=True):
        final = record.final or {}
        best, test, git = final.get("best_validation") or {}, final.get("test") or {}, record.git or {}
        last = {} if record.final else _last_validation(record)
        rows.append(
            {
                "run": label,
                "path": record.path,
                "source": record.source,
                "status": record.status,
                "reason": (record.stopped or {}).get("reason"),
                "config": {name: config.get(name, ABSENT) if config else None for name in fields},
                # A run that stopped early (pruned, preempted) has no final report: its best validation so far,
                # marked intermediate, and its last one (the value a pruner judged).
                "best_val_accuracy": best.get("val_accuracy", last.get("best_val_accuracy")),
                "best_val_step": best.get("step", last.get("best_val_step")),
                "intermediate": bool(last),
                "last_val_accuracy": last.get("val_accuracy"),
                "last_val_epoch": last.get("epoch"),
                "test_accuracy": test.get("accuracy"),
                "f1_macro": test.get("f1_macro"),
                "auroc_macro": test.get("auroc_macro"),
                "seconds": final.get("seconds"),
                "steps": final.get("steps") if final.get("steps") is not None else _last_step(record),
                "commit": (git.get("commit") or "")[:7] or None,
                "dirty": git.get("dirty"),
            }
        )
    return fields, rows


def _labels(records: list[runs.RunRecord]) -> list[str]:
    """Run names, told apart where two share one: by source, then parent folder (two sweeps' `00-0.01`), then index."""
    labels = [record.name for record in records]
    for widen in (lambda r, label: f"{label} ({SOURCES[r.source]})", lambda r, label: f"{_parent(r)}/{label}"):
        labels = [
            widen(r, label) if labels.count(label) > 1 else label for r, label in zip(records, labels, strict=True)
        ]
    return [label if labels.count(label) == 1 else f"{label} #{i}" for i, label in enumerate(labels)]


def _parent(record: runs.RunRecord) -> str:
    return os.path.basename(os.path.dirname(record.path.rstrip("/")))


def _last_validation(record: runs.RunRecord) -> dict:
    """A run without a final report: its last validation (accuracy, epoch) and its best so far; {} for none."""
    rows = [row for row in record.history or [] if "val/accuracy" in row]
    if not rows:
        return {}
    best = max(rows, key=lambda row: row["val/accuracy"])
    return {
        "val_accuracy": rows[-1]["val/accuracy"],
        "epoch": rows[-1].get("val/epoch"),
        "best_val_accuracy": best["val/accuracy"],
        "best_val_step": best["step"],
    }


def _last_step(record: runs.RunRecord) -> int | None:
    """How far a run that did not finish got: its last logged step, or where it says it stopped."""
    steps = [row["step"] for row in record.history or []]
    steps += [(record.stopped or {}).get("step")]
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


def sort_rows(rows: list[dict], field: str, reverse: bool = False) -> list[dict]:
    """Rows ordered by a column or config field: accuracies, F1, AUROC best first, the rest ascending; blanks last.

    Raises:
      ConfigError: `field` is neither a column nor a config field of these runs.
    """
    columns = ("run", "status", *METRICS, "commit")
    if field not in columns and not any(field in row["config"] for row in rows):
        raise ConfigError(f"--sort {field}: not a column ({', '.join(columns)}) or a config field that differs")
    value = (lambda row: row[field]) if field in columns else (lambda row: row["config"].get(field))
    present = [row for row in rows if value(row) not in (None, ABSENT)]
    missing = [row for row in rows if value(row) in (None, ABSENT)]

    def key(row) -> tuple:
        v = value(row)
        number = isinstance(v, (int, float))
        return (0, v, "") if number else (1, 0, json.dumps(v, default=str))

    return sorted(present, key=key, reverse=(field in HIGHER_IS_BETTER) != reverse) + missing


def cell(value, field: str = "") -> str:
    """One value as the table shows it."""
    if value is None:
        return "-"
    if field in HIGHER_IS_BETTER:
        return f"{value:.4f}"
    if field == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def table_cells(fields: list[str], rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and the cells of the table (shared by the text and the HTML)."""
    header = ["run", "status", *fields, *METRICS.values(), "commit"]
    cells = []
    for row in rows:
        commit = "-" if row["commit"] is None else row["commit"] + ("-dirty" if row["dirty"] else "")
        config = [cell(row["config"][name]) for name in fields]
        metrics = [
            cell(row[m], m) + ("*" if m == "best_val_accuracy" and row.get("intermediate") else "") for m in METRICS
        ]
        cells.append([row["run"], row["status"], *config, *metrics, commit])
    return header, cells


def format_table(fields: list[str], rows: list[dict]) -> str:
    """The comparison as aligned text, then one line for each run that did not finish."""
    header, cells = table_cells(fields, rows)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def join(line: list[str]) -> str:
        return "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()

    lines = [join(header), join(["-" * width for width in widths]), *map(join, cells)]
    notes = [_note(row) for row in rows if row["status"] != "finished"]
    return "\n".join(lines + ([""] + notes if notes else []))


def _note(row: dict) -> str:
    """Why a run has no final report, and its last validation, in one line."""
    note = f"{row['run']}: {row['status']}: {row['reason'] or 'no final report: still running, or killed'}"
    if row.get("last_val_accuracy") is not None:
        epoch = row.get("last_val_epoch")
        note += (
            f"; last validation{'' if epoch is None else f' (epoch {epoch})'}: acc {row['last_val_accuracy']:.4f}"
            " (* best so far: intermediate, the run stopped early)"
        )
    return note


# ---------------------------------------------------------------- the HTML page

STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:14px}th{background:#f0f0f0}"
    ".swatch{display:inline-block;width:.9em;height:.9em;margin-right:.4em;vertical-align:middle}"
    "figure{display:inline-block;margin:.5em}img{max-width:100%}.error{color:#a00}"
)


def _colours(count: int) -> list[str]:
    """One colour per run, the same in the table and every figure."""
    from matplotlib import colormaps, colors

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [colors.to_hex(palette(i % palette.N)) for i in range(count)]


def _png(figure) -> str:
    """A matplotlib figure as a `data:` URI (PNG, base64)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def steps_per_epoch(record: runs.RunRecord) -> float | None:
    """Steps in one epoch: a finished run's steps over its epochs, else its first validation (every N epochs)."""
    config, final = record.config, record.final or {}
    if final.get("steps") and config.get("num_epochs"):
        return final["steps"] / config["num_epochs"]
    validated = [row["step"] for row in record.history or [] if "val/accuracy" in row]
    return validated[0] / config.get("eval_every_epochs", 1) if validated and validated[0] else None


def curves_figure(records: list[runs.RunRecord], labels: list[str], colours: list[str], x_axis: str) -> str | None:
    """Train loss, validation loss and accuracy of every run, overlaid; a data URI, or None with nothing logged."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(13, 3.8))
    axes = figure.subplots(1, len(CURVES))
    legend = []
    for record, label, colour in zip(records, labels, colours, strict=True):
        scale = steps_per_epoch(record) if x_axis == "epoch" else 1
        drawn = False
        for ax, (key, _) in zip(axes, CURVES, strict=True):
            steps, values = record.series(key) if record.history is not None and scale else ([], [])
            if len(steps):
                ax.plot(steps / scale, values, color=colour, marker="." if len(steps) < 4 else None)
                drawn = True
        if drawn:
            legend.append(Line2D([], [], color=colour, label=label))
    if not legend:
        return None
    for ax, (_, title) in zip(axes, CURVES, strict=True):
        ax.set(title=title, xlabel=x_axis)
        ax.grid(alpha=0.3)
    figure.legend(handles=legend, loc="lower center", ncol=min(len(legend), 5), bbox_to_anchor=(0.5, -0.12))
    return _png(figure)


def confusion_figure(matrix: list[list[int]], class_names=None) -> str:
    """One run's test confusion matrix (rows: true class, columns: predicted), counts written in the cells, the
    axes labelled with the run's recorded class names (where they are as many as the rows)."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    size = max(1.0, len(counts) / 10)  # 10 classes in 4.2 x 3.8 inches; more classes, a larger figure
    figure = Figure(figsize=(4.2 * size, 3.8 * size))
    ax = figure.subplots()
    shown = ax.imshow(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for (true, predicted), count in np.ndenumerate(counts):
        if count:
            dark = shown.norm(shown.get_array()[true, predicted]) > 0.5
            ax.text(predicted, true, str(count), ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.set(xlabel="predicted", ylabel="true", xticks=range(len(counts)), yticks=range(len(counts)))
    if class_names is not None and len(class_names) == len(counts):
        ax.set_xticklabels(class_names, rotation=90, fontsize=7)
        ax.set_yticklabels(class_names, fontsize=7)
    return _png(figure)


def _html_table(header: list[str], cells: list[list[str]], colours: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, line in enumerate(cells):
        first = html.escape(line[0])
        if colours:
            first = f'<span class="swatch" style="background:{colours[i]}"></span>{first}'
        body.append(f"<tr><td>{first}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in line[1:]) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _config_section(records: list[runs.RunRecord], labels: list[str], fields: list[str], resolved: bool) -> str:
    """The differing fields, a row each and a column per run; the fields all runs share, folded away."""
    configs = [record.config if resolved else record.requested_config for record in records]
    if fields:
        cells = [[name, *(cell(c.get(name, ABSENT)) if c else "-" for c in configs)] for name in fields]
        differ = _html_table(["field", *labels], cells)
    else:
        differ = "<p>The runs' configs do not differ.</p>"
    present = [c for c in configs if c]
    common = sorted(k for k in (present[0] if present else {}) if k not in fields and k not in RUNNER_FIELDS)
    shared = _html_table(["field", "value"], [[k, cell(present[0][k])] for k in common])
    return f"{differ}<details><summary>{len(common)} fields every run shares</summary>{shared}</details>"


def render_html(
    records: list[runs.RunRecord], fields: list[str], rows: list[dict], errors: list[str], resolved: bool, x_axis: str
) -> str:
    """The whole self-contained page: table, curves, confusion matrices, config difference (no external link).

    Args:
      records, fields, rows: the runs and `build_rows`' fields and rows for them, in the same order.
      errors: the references that could not be read, said at the top.
    """
    header, cells = table_cells(fields, rows)
    labels, colours = [row["run"] for row in rows], _colours(len(rows))
    notes = "".join(f"<li>{html.escape(_note(row))}</li>" for row in rows if row["status"] != "finished")
    curves = curves_figure(records, labels, colours, x_axis)
    matrices = [
        (label, confusion_figure(r.final["test"]["confusion_matrix"], r.data.class_names if r.data else None))
        for r, label in zip(records, labels, strict=True)
        if ((r.final or {}).get("test") or {}).get("confusion_matrix")
    ]
    figures = "".join(
        f'<figure><img src="{uri}" alt="confusion matrix of {html.escape(label)}">'
        f"<figcaption>{html.escape(label)}</figcaption></figure>"
        for label, uri in matrices
    )
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # The page may load nothing from anywhere: every image is a data: URI, the style is inline.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        f"<title>Comparison of {len(rows)} runs</title><style>{STYLE}</style></head><body>",
        f"<h1>Comparison of {len(rows)} runs</h1>",
        f"<p>Written {datetime.datetime.now():%Y-%m-%d %H:%M} by <code>python -m mnist_flax compare</code>.</p>",
        "".join(f'<p class="error">error: {html.escape(e)}</p>' for e in errors),
        "<h2>Runs</h2>",
        _html_table(header, cells, colours),
        f"<ul>{notes}</ul>" if notes else "",
        f"<h2>Learning curves (by {x_axis})</h2>",
        f'<img src="{curves}" alt="learning curves">' if curves else "<p>No curves were logged.</p>",
        "<h2>Test confusion matrices</h2>",
        figures or "<p>No run has a final test report.</p>",
        "<h2>Config difference</h2>",
        _config_section(records, labels, fields, resolved),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


# ---------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_flax compare",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="workdir, sweep root, W&B run folder or path")
    parser.add_argument("--sort", metavar="FIELD", help="order by a column (test_accuracy, seconds, ...) or field")
    parser.add_argument("--reverse", action="store_true", help="reverse the --sort order")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    parser.add_argument("--x-axis", choices=("step", "epoch"), default="step", help="the curves' x axis in --html")
    parser.add_argument("--resolved", action="store_true", help="compare the configs the runs trained with")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records, errors = gather(args.runs, predictions=bool(args.html))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not records:
        if not errors:
            print("error: no runs to compare (the sweep roots name none)", file=sys.stderr)
        return layout.EXIT_USAGE
    fields, rows = build_rows(records, args.resolved)
    if args.sort:
        try:
            order = {id(row): record for row, record in zip(rows, records, strict=True)}
            rows = sort_rows(rows, args.sort, args.reverse)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return layout.EXIT_USAGE
        records = [order[id(row)] for row in rows]
    if args.json:
        print(json.dumps({"fields": fields, "runs": rows, "errors": errors}, indent=2, default=str))
    else:
        print(format_table(fields, rows))
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(render_html(records, fields, rows, errors, args.resolved, args.x_axis))
        except OSError as e:
            print(f"error: cannot write {args.html}: {e.strerror}", file=sys.stderr)
            return layout.EXIT_USAGE
    if errors:
        print(f"compared {len(rows)} runs; left out the {len(errors)} above", file=sys.stderr)
    return layout.EXIT_USAGE if errors else 0
