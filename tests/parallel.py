"""How `make test` splits the suite over two pytest-xdist workers (`-n 2 --dist loadgroup`): a plugin that
tests/conftest.py loads.

Most of the suite's time is spent waiting on one core: a new process's imports, XLA compiling, a Docker build,
a database outage, a Slurm requeue. Two workers keep both cores busy. Each test module is one group, run by one
worker, so its module fixtures are built once; the modules that read the same session run (tests/shared.py)
form one group, so that run is trained once. Groups start longest first, so the last one to start is short:
the Makefile passes `--no-loadscope-reorder`, since xdist otherwise starts the groups with the most tests first,
whatever their time (a 3-test Docker module ran last and was the suite's tail).
Without xdist (`make test-fast`, `pytest tests/test_x.py`) the groups change nothing but the order.
"""

import pytest

# Modules that read the same session-scoped run: one group each, named for the run.
SHARED_RUNS = {
    "finished_mlp_run": (
        "test_config",
        "test_drift",
        "test_lineage",
        "test_runs",
        "test_compile_cache",
        "test_wandb_server",
        "test_add_a_model",
    ),
    "served_runs": ("test_export", "test_predict"),
    "single_device_run": ("test_distributed", "test_slurm"),
}
# The longest groups (each over a minute on two cores), in the order they start; the others follow in file order.
LONGEST_FIRST = (
    "test_container",
    "test_sweep_outage",
    "finished_mlp_run",
    "test_sweep",
    "single_device_run",
    "test_faults",
    "served_runs",
    "test_tracking",
    "test_reproduce",
    "test_notebooks",
    "test_sweep_postgresql",
    "test_compare",
)
_GROUP_OF = {module: group for group, modules in SHARED_RUNS.items() for module in modules}


def group_of(item) -> str:
    module = item.path.stem
    return _GROUP_OF.get(module, module)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(session, config, items):
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of(item)))
    items.sort(key=lambda item: rank.get(group_of(item), len(rank)))  # stable: file order within a rank
