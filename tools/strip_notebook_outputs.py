"""Strips outputs from notebooks, or checks there are none: `python tools/strip_notebook_outputs.py [--check] [NB ...]`.

Notebooks are committed without outputs: no cell outputs, no execution counts,
no execution timing in the cell metadata. Diffs then show code and prose only,
and no figure or number from someone's run lands in git. Without paths, every
notebooks/*.ipynb. With --check nothing is changed and the exit status is 1 when
a notebook has outputs (CI runs this); without it, such notebooks are rewritten.
"""

import argparse
import sys
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parent.parent
# Cell metadata that only records an execution (Jupyter, nbclient, JupyterLab's timing extension).
EXECUTION_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")


def dirty_cells(notebook: nbformat.NotebookNode) -> list[int]:
    """Indices of the cells that carry outputs, an execution count, or execution metadata."""
    dirty = []
    for index, cell in enumerate(notebook.cells):
        has_outputs = bool(cell.get("outputs")) or cell.get("execution_count") is not None
        if has_outputs or any(key in cell.get("metadata", {}) for key in EXECUTION_METADATA):
            dirty.append(index)
    return dirty


def strip(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Removes outputs, execution counts and execution metadata, in place; returns the notebook.

    The kernel's language_info (its Python version and such, filled in by every
    execution) is cut back to the language name, so running a notebook on
    another machine and stripping it leaves the file as it was.
    """
    language_info = notebook.metadata.get("language_info")
    if language_info:
        notebook.metadata["language_info"] = {"name": language_info.get("name", "python")}
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in EXECUTION_METADATA:
            cell.get("metadata", {}).pop(key, None)
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook has outputs")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 2
    found = []
    for path in paths:
        try:
            notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        except (OSError, ValueError) as e:  # nbformat raises ValueError subclasses for bad JSON
            print(f"{path}: cannot read: {e}", file=sys.stderr)
            return 2
        cells = dirty_cells(notebook)
        if not cells:
            continue
        found.append(path)
        if args.check:
            numbers = ", ".join(str(i + 1) for i in cells)
            print(f"{path}: outputs in cell(s) {numbers}; strip with: python tools/strip_notebook_outputs.py {path}")
        else:
            nbformat.write(strip(notebook), path)
            print(f"{path}: stripped {len(cells)} cell(s)")
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
