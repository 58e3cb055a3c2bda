"""The package's folders are its layers: every import points downwards, and `python -m mnist_flax` is the one entry."""

import ast
import pathlib
import re
import subprocess
import sys

from conftest import REPO_ROOT

PACKAGE = pathlib.Path(REPO_ROOT) / "mnist_flax"
# Bottom to top. A module may import its own layer and those below it, never one above.
LAYERS = [
    "errors",
    "layout",
    "models",
    "datasets",
    "config",
    "tracking",
    "records",
    "training",
    "serving",
    "sweeps",
    "commands",
    "__main__",
]
RANK = {name: 0 if name in ("errors", "layout") else i for i, name in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    """'mnist_flax.training.loop' -> 'training'; 'mnist_flax.errors' -> 'errors'."""
    return module.split(".")[1]


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every mnist_flax import in the file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnist_flax"):
            if node.module == "mnist_flax":
                found += [(node.lineno, f"mnist_flax.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mnist_flax.")]
    return found


def modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_lives_in_a_layer():
    for path in modules():
        relative = path.relative_to(PACKAGE)
        layer = relative.parts[0].removesuffix(".py")
        assert layer in RANK or relative == pathlib.Path("__init__.py"), f"{relative} is in no layer of {LAYERS}"
        assert len(relative.parts) <= 2, f"{relative}: the subpackages are one level deep"


def test_imports_only_point_downwards():
    upward = []
    for path in modules():
        relative = path.relative_to(PACKAGE)
        if relative == pathlib.Path("__init__.py"):
            continue
        own = relative.parts[0].removesuffix(".py")
        for line, module in imports(path):
            target = layer_of(module)
            assert target in RANK, f"{relative}:{line} imports {module}, which is in no layer"
            if RANK[target] > RANK[own]:
                upward.append(f"{relative}:{line} ({own}) imports {module} ({target})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    # The test above is only worth something if it would fail: an import of commands from training is upward.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from mnist_flax.commands import compare\n")
    ((_, module),) = imports(probe)
    assert RANK[layer_of(module)] > RANK["training"]


def test_no_import_needs_an_alias():
    aliased = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {alias.name} as {alias.asname}"
        for path in modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_flax")
        for alias in node.names
        if alias.asname
    ]
    assert not aliased


def run_entry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_flax", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_python_m_mnist_flax_lists_its_commands_and_refuses_an_unknown_one():
    listed = run_entry("--help")
    assert listed.returncode == 0, listed.stderr
    for command in ("train", "compare", "diff", "reproduce", "sync", "sweep", "export", "predict"):
        assert f"  {command} " in listed.stdout
    unknown = run_entry("fit")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "error: unknown command 'fit'; the commands are train, compare, diff, reproduce, sync, sweep, export, predict"
    ]
    assert run_entry().returncode == 2  # no command: the usage, and a usage error


def own_flags(command: str) -> list[str]:
    """The flags a command's module defines itself (argparse's `--name`, absl's DEFINE_*("name")), read from source."""
    source = (PACKAGE / "commands" / f"{command}.py").read_text()
    argparse_flags = re.findall(r"\badd(?:_argument)?\(\s*\"(--[a-z][a-z0-9-]*)\"", source)
    absl_flags = [f"--{name}" for name in re.findall(r"\bDEFINE_\w+\(\s*\"(\w+)\"", source)]
    return argparse_flags + absl_flags


def test_each_command_answers_help_under_its_own_name_with_its_own_flags():
    for command in ("train", "compare", "diff", "reproduce", "sync", "sweep", "export", "predict"):
        result = run_entry(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"python -m mnist_flax {command}" in result.stdout
        expected = own_flags(command)
        assert expected, f"{command}: the source scan found no flags, so this test would check nothing"
        missing = [flag for flag in expected if flag not in result.stdout]
        assert not missing, f"`{command} --help` does not list {missing}:\n{result.stdout}"
    assert set(own_flags("train")) == {"--config", "--workdir"}


def test_main_py_help_lists_the_train_flags():
    result = subprocess.run(
        [sys.executable, "main.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python main.py" in result.stdout
    assert "--config" in result.stdout and "--workdir" in result.stdout and "--config.FIELD=VALUE" in result.stdout


def test_train_through_the_entry_is_main_py():
    # Both parse the same flags: a wrong field is the same one line and exit 2 from either.
    via_entry = run_entry("train", "--config=configs/mlp.py", "--config.optimizer.learning_rat=0.1")
    via_main = subprocess.run(
        [sys.executable, "main.py", "--config=configs/mlp.py", "--config.optimizer.learning_rat=0.1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert via_entry.returncode == via_main.returncode == 2
    assert via_entry.stderr == via_main.stderr
    assert "learning_rate" in via_entry.stderr and len(via_entry.stderr.strip().splitlines()) == 1
