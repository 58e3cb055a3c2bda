"""The periodic rule with fused calls, and the resolved config a run records."""

import json
import os
import re

import ml_collections
import pytest
from conftest import REPO_ROOT, run_main, tiny_overrides

from mnist_flax import datasets, layout
from mnist_flax.config import schema
from mnist_flax.training import periodic, resolution

FASHION_MNIST = datasets.recorded(None, "fashion_mnist")  # the default data set: 28x28x1, 10 classes


def _config(num_epochs, log_every, eval_every, checkpoint_every) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "num_epochs": num_epochs,
            "log_every_steps": log_every,
            "eval_every_epochs": eval_every,
            "checkpoint": {"every_epochs": checkpoint_every},
        }
    )


def _call_ends(steps_per_epoch, num_epochs, steps_per_call, start=0):
    """Where each compiled call ends, worked out by hand: calls of steps_per_call, cut at each epoch end."""
    ends = []
    for epoch in range(start // steps_per_epoch, num_epochs):
        first = max(start, epoch * steps_per_epoch)
        ends += list(range(first + steps_per_call, (epoch + 1) * steps_per_epoch, steps_per_call))
        ends.append((epoch + 1) * steps_per_epoch)
    return ends


def _fired(config, steps_per_epoch, steps_per_call, start=0):
    """The steps at which each rule fires, as the loop drives them (periodic.calls, then rule.is_time)."""
    rules = periodic.rules(config, steps_per_epoch)
    fired = {name: [] for name in rules}
    ends = []
    for epoch in range(start // steps_per_epoch, config.num_epochs):
        epoch_start = max(start, epoch * steps_per_epoch)
        for previous, step in periodic.calls(epoch_start, (epoch + 1) * steps_per_epoch, steps_per_call):
            ends.append(step)
            for name, rule in rules.items():
                if rule.is_time(previous, step):
                    fired[name].append(step)
    return fired, ends


SETTINGS = [
    (steps_per_call, steps_per_epoch, log_every, eval_every, checkpoint_every)
    for steps_per_call in (1, 3, 50)
    for steps_per_epoch in (7, 20, 24, 137)
    for log_every, eval_every, checkpoint_every in ((5, 1, 1), (100, 2, 3), (1, 3, 2))
]


@pytest.mark.parametrize(("steps_per_call", "steps_per_epoch", "log_every", "eval_every", "checkpoint_every"), SETTINGS)
def test_actions_fire_where_the_config_says(steps_per_call, steps_per_epoch, log_every, eval_every, checkpoint_every):
    num_epochs = 4
    config = _config(num_epochs, log_every, eval_every, checkpoint_every)
    fired, ends = _fired(config, steps_per_epoch, steps_per_call)
    assert ends == _call_ends(steps_per_epoch, num_epochs, steps_per_call)  # no call crosses an epoch end
    epoch_ends = [(e + 1) * steps_per_epoch for e in range(num_epochs)]
    # Logging: the first call to reach each multiple of log_every, and every epoch end.
    multiples = range(log_every, num_epochs * steps_per_epoch + 1, log_every)
    expected_log = sorted({min(end for end in ends if end >= m) for m in multiples} | set(epoch_ends))
    assert fired["log"] == expected_log
    # Evaluation and checkpoints: every N epochs and after the last epoch; never inside an epoch.
    assert fired["evaluate"] == [e for i, e in enumerate(epoch_ends, 1) if i % eval_every == 0 or i == num_epochs]
    assert fired["checkpoint"] == [
        e for i, e in enumerate(epoch_ends, 1) if i % checkpoint_every == 0 or i == num_epochs
    ]


@pytest.mark.parametrize("steps_per_call", [1, 3, 50])
def test_a_resumed_run_fires_as_the_uninterrupted_one_from_then_on(steps_per_call):
    config = _config(3, 10, 1, 2)
    whole, ends = _fired(config, 24, steps_per_call)
    for start in [0, *ends[:-1]]:  # a checkpoint at any call boundary
        resumed, _ = _fired(config, 24, steps_per_call, start=start)
        for name in whole:
            assert resumed[name] == [s for s in whole[name] if s > start], (name, start)


def test_periodic_rule_every_and_on_steps():
    rule = periodic.Periodic((10,), on_steps=(25,))
    assert rule.is_time(9, 10) and rule.is_time(7, 12) and rule.is_time(0, 50)
    assert not rule.is_time(10, 19) and not rule.is_time(0, 9)
    assert rule.is_time(24, 25) and not rule.is_time(25, 29)
    assert not periodic.Periodic((0,)).is_time(0, 100)  # 0 = never


# ---------------------------------------------------------------- resolve once


def _default():
    return schema.load_config_file(os.path.join(REPO_ROOT, "configs/default.py"))


def test_resolver_gives_each_backend_its_values():
    config = _default()
    cpu = resolution.resolve(config, FASHION_MNIST, backend="cpu", num_devices=1)
    assert (cpu.train.steps_per_call, cpu.train.scan_unroll, cpu.train.batch_split) == (3, 3, 8)
    gpu = resolution.resolve(config, FASHION_MNIST, backend="gpu", num_devices=1)
    assert (gpu.train.steps_per_call, gpu.train.scan_unroll, gpu.train.batch_split) == (50, 1, 1)
    four = resolution.resolve(
        config, FASHION_MNIST, backend="cpu", num_devices=4
    )  # 32 examples a device: 2 pieces of 16
    assert four.train.batch_split == 2
    assert config.train.steps_per_call == "auto"  # the config given is not changed
    for resolved in (cpu, gpu, four):
        assert "auto" not in schema.flatten(resolved).values()


def test_resolver_checks_the_batch_against_the_devices():
    from mnist_flax.errors import ConfigError

    config = _default()
    with pytest.raises(ConfigError, match="batch_size: 128 does not split evenly over 3 devices"):
        resolution.resolve(config, FASHION_MNIST, backend="cpu", num_devices=3)
    config.train.batch_split = "3"
    with pytest.raises(ConfigError, match="3 pieces do not divide the batch of 128"):
        resolution.resolve(config, FASHION_MNIST, backend="cpu", num_devices=1)


@pytest.mark.parametrize("config_name", ["cnn", "mlp"])
def test_a_run_records_the_resolved_config_it_used(tiny_data_dir, tmp_path, config_name):
    workdir = tmp_path / config_name
    result = run_main(
        [f"--config=configs/{config_name}.py", f"--workdir={workdir}", *tiny_overrides(tiny_data_dir, num_epochs=1)]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    recorded = json.loads((workdir / layout.CONFIG).read_text())
    flat = schema.flatten(recorded)
    assert "auto" not in flat.values()
    # What the run says it used is what config.json holds.
    described = re.search(r"(\d+) step\(s\)/call, batch in (\d+) piece", result.stdout)
    assert int(described.group(1)) == flat["train.steps_per_call"] == 3
    assert flat["train.scan_unroll"] == 3
    assert flat["data.source"] == "idx" and flat["data.local_dir"] == tiny_data_dir
    assert flat["wandb.mode"] == "offline"
    assert int(described.group(2)) == flat["train.batch_split"] == 2  # batch 50: 2 pieces of 25
    # What the file and the overrides said stays beside it, for diffs of intent.
    requested = schema.flatten(json.loads((workdir / layout.CONFIG_REQUESTED).read_text()))
    assert requested["train.steps_per_call"] == "auto" and requested["data.source"] == "auto"
    assert {k for k, v in requested.items() if v != flat[k]} <= {
        "train.steps_per_call",
        "train.scan_unroll",
        "train.batch_split",
        "data.source",
        "data.local_dir",
        "wandb.mode",
    }
    # The metrics show the periodic rule at work: validation at each epoch end, train logs on call boundaries.
    lines = [json.loads(line) for line in (workdir / layout.METRICS).read_text().splitlines()]
    steps_per_epoch = (1200 - 200) // 50
    assert [r["step"] for r in lines if "val/accuracy" in r] == [steps_per_epoch]
    logged = [r["step"] for r in lines if "train/loss" in r]
    assert logged == [6, 12, 15, 20]  # first call end at or past 5, 10, 15, and the epoch end
