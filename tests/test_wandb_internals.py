"""wandb's private names are used in one module only, and a wandb that changed them is one warning, not a crash."""

import ast
import pathlib

from conftest import REPO_ROOT

from mnist_flax.tracking import wandb_internals

PRIVATE = {"_console_stop", "_wl", "_asyncer", "wandb_internal_pb2", "_log_artifact"}


def test_no_module_but_wandb_internals_touches_a_private_wandb_name():
    users = []
    for path in sorted((pathlib.Path(REPO_ROOT) / "mnist_flax").rglob("*.py")):
        if path.name == "wandb_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "attr", None) or getattr(node, "id", None)
            if isinstance(node, ast.alias):
                name = node.name.rsplit(".", 1)[-1]
            if name in PRIVATE:
                users.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {name}")
    assert not users


def test_the_pinned_wandb_has_every_private_name(tmp_path):
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="internals", settings=wandb.Settings(silent=True))
    try:
        assert wandb_internals.check(run) == []
    finally:
        run.finish()
    assert wandb.__version__ == wandb_internals.CHECKED_WITH  # upgrading wandb means reading the names again


def test_a_changed_internal_is_one_warning_and_the_uses_do_nothing(capsys):
    class Moved:  # a run of a wandb that renamed both names
        pass

    assert wandb_internals.check(Moved()) == ["Run._console_stop", "Run._wl._asyncer", "Run._log_artifact"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: wandb ")
    assert (
        "Run._console_stop, Run._wl._asyncer, Run._log_artifact" in lines[0]
        and wandb_internals.CHECKED_WITH in lines[0]
    )
    wandb_internals.stop_console(Moved())  # no AttributeError
