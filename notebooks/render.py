"""Executes the notebooks headless and renders them as HTML: `python notebooks/render.py [--run DIR] ...`.

Each notebook runs top to bottom in a fresh kernel started in notebooks/ (as
Jupyter would), with its parameters passed through the environment: the first
code cell of each notebook reads them (MNIST_FLAX_DATASET, MNIST_FLAX_DATA_DIR,
MNIST_FLAX_RUN, MNIST_FLAX_OTHER_RUN, MNIST_FLAX_NOTEBOOK_SUMMARY). For each
notebook the output folder gets the executed notebook, its HTML, and the JSON
summary of the numbers it computed; with --figures, every figure as a PNG.

A cell that raises stops the notebook; the partly executed notebook and its HTML
are still written (they show the traceback), and the exit status is 1.
"""

import argparse
import base64
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS_DIR = Path(__file__).resolve().parent
NOTEBOOKS = ("01_data", "02_runs")
DEFAULT_OUT = NOTEBOOKS_DIR / "_build"


def notebook_env(
    dataset: str = "", data_dir: str = "", run: str = "", other_run: str = "", summary_path: str = ""
) -> dict[str, str]:
    """The environment variables that carry the notebooks' parameters (empty = the notebook's default)."""
    values = {
        "MNIST_FLAX_DATASET": dataset,
        "MNIST_FLAX_DATA_DIR": data_dir,
        "MNIST_FLAX_RUN": run,
        "MNIST_FLAX_OTHER_RUN": other_run,
        "MNIST_FLAX_NOTEBOOK_SUMMARY": summary_path,
    }
    return {name: value for name, value in values.items() if value}


def execute(path: Path, env: dict[str, str], timeout: int = 600) -> tuple[nbformat.NotebookNode, Exception | None]:
    """Runs a notebook in a fresh kernel; returns it with its outputs, and the error that stopped it (or None)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    )
    kernel_env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_FLAX_")}
    # Figures come back as PNG outputs only with the inline backend (an inherited MPLBACKEND=Agg would hide them).
    kernel_env.update({"MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONWARNINGS": "ignore"})
    kernel_env.update(env)
    try:
        client.execute(env=kernel_env)
    except CellExecutionError as e:
        return notebook, e
    return notebook, None


def figures(notebook: nbformat.NotebookNode) -> list[bytes]:
    """The PNG images of a notebook's outputs, in order."""
    images = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                images.append(base64.b64decode(data["image/png"]))
    return images


def render(name: str, env: dict[str, str], out_dir: Path, save_figures: bool = False, timeout: int = 600) -> bool:
    """Executes notebooks/NAME.ipynb and writes NAME.ipynb, NAME.html (and figures) under out_dir; True if it ran."""
    from nbconvert import HTMLExporter

    out_dir.mkdir(parents=True, exist_ok=True)
    notebook, error = execute(NOTEBOOKS_DIR / f"{name}.ipynb", env, timeout)
    nbformat.write(notebook, out_dir / f"{name}.ipynb")
    html, _ = HTMLExporter().from_notebook_node(notebook)
    (out_dir / f"{name}.html").write_text(html)
    images = figures(notebook)
    if save_figures:
        (out_dir / "figures").mkdir(exist_ok=True)
        for number, image in enumerate(images, 1):
            (out_dir / "figures" / f"{name}_{number:02d}.png").write_bytes(image)
    if error is not None:
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        print(f"{name}: FAILED ({last_line}); see {out_dir / (name + '.html')}", file=sys.stderr)
        return False
    print(f"{name}: {len(images)} figures -> {out_dir / (name + '.html')}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="", help="run workdir or W&B run for 02 (default: newest run under runs/)")
    parser.add_argument(
        "--other-run", default="", help="run to compare with (default: the next newest under runs/; 'none' = skip)"
    )
    parser.add_argument("--dataset", default="", help="data set for 01: fashion_mnist (default) or mnist")
    parser.add_argument("--data-dir", default="", help="folder of IDX files (default: where the config finds them)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: notebooks/_build)")
    parser.add_argument("--only", choices=NOTEBOOKS, action="append", help="render only this notebook (repeatable)")
    parser.add_argument("--figures", action="store_true", help="also save every figure as OUT/figures/NAME_NN.png")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    out_dir = Path(args.out).resolve()
    ok = True
    for name in args.only or NOTEBOOKS:
        env = notebook_env(
            dataset=args.dataset,
            data_dir=args.data_dir,
            run=str(Path(args.run).resolve()) if args.run and Path(args.run).exists() else args.run,
            other_run=str(Path(args.other_run).resolve())
            if args.other_run and Path(args.other_run).exists()
            else args.other_run,
            summary_path=str(out_dir / f"{name}.summary.json"),
        )
        ok = render(name, env, out_dir, args.figures, args.timeout) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
