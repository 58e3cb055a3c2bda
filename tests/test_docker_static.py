"""The container recipe and the launch scripts, checked without a Docker engine.

The Dockerfile and .dockerignore are read the way Docker reads them; the shell
scripts go through shellcheck; docker_run.sh and slurm.sbatch run against stub
`docker`, `scontrol` and `srun` commands that record what they were asked to do.
"""

import os
import re
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

SHELL_SCRIPTS = [
    "entrypoint.sh",
    ".ci/docker_base.sh",
    "launch/docker_run.sh",
    "launch/sweep.sh",
    "launch/sweep_run.sh",
    "launch/sync.sh",
    "launch/wandb_env.sh",
    "launch/slurm.sbatch",
    "launch/sweep_array.sbatch",
    "tools/repeat_test.sh",
    "tools/setup_venv.sh",
    "tools/install_locked.sh",
]
SECRET_NAMES = ("WANDB_API_KEY", "WANDB_TOKEN", "API_KEY", "TOKEN", "PASSWORD", "SECRET")


def read(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path)) as f:
        return f.read()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in read("Dockerfile").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, arguments = current.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        current = ""
    return instructions


def pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `*` and `?` stay within a folder, `**` spans folders."""
    parts = []
    for segment in pattern.split("/"):
        if segment == "**":
            parts.append("(?:[^/]+/)*")
            continue
        out, i = "", 0
        while i < len(segment):
            char = segment[i]
            if char == "*":
                out += "[^/]*"
            elif char == "?":
                out += "[^/]"
            elif char == "[":
                end = segment.index("]", i)
                out += segment[i : end + 1]
                i = end
            else:
                out += re.escape(char)
            i += 1
        parts.append(out + "/")
    return re.compile("^" + "".join(parts).removesuffix("/") + "$")


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out, by Docker's rules.

    Patterns match the whole path from the context root or one of its parent
    folders (an excluded folder takes its contents along); the last matching
    pattern wins, and `!` re-includes.
    """
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in read(".dockerignore").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = pattern_regex(os.path.normpath(pattern.lstrip("!").strip("/")))
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_takes_its_base_and_jax_flavour_as_build_arguments():
    instructions = dockerfile_instructions()
    first_from = next(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    assert any(k == "ARG" and a.startswith("BASE_IMAGE=") for k, a in instructions[:first_from])
    assert all("${BASE_IMAGE}" in a for k, a in instructions if k == "FROM")
    assert any(k == "ARG" and a.startswith("JAX_FLAVOUR") for k, a in instructions)
    extra = next(a for k, a in instructions if k == "RUN" and "JAX_FLAVOUR" in a)
    assert 'install_locked.sh /tmp/lock --extra "$JAX_FLAVOUR"' in extra and "cpu)" in extra


def test_dockerfile_runs_as_a_non_root_user_with_the_entrypoint():
    instructions = dockerfile_instructions()
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert instructions[-2:][0] == ("ENTRYPOINT", '["/app/entrypoint.sh"]')
    cmd = next(a for k, a in instructions if k == "CMD")
    assert cmd.startswith("[") and "main.py" in cmd and "--config=configs/" in cmd  # exec form, trains
    entrypoint = os.path.join(REPO_ROOT, "entrypoint.sh")
    assert os.access(entrypoint, os.X_OK)  # COPY keeps the mode: the image can execute it
    assert read("entrypoint.sh").startswith("#!/usr/bin/env bash\n")


def test_dockerfile_installs_the_lock_before_the_code_in_two_layers():
    instructions = dockerfile_instructions()
    copy_lock = next(i for i, (k, a) in enumerate(instructions) if k == "COPY" and "uv.lock" in a)
    installs = [i for i, (k, a) in enumerate(instructions) if k == "RUN" and "install_locked.sh" in a]
    flavour = next(i for i, (k, a) in enumerate(instructions) if k == "ARG" and a.startswith("JAX_FLAVOUR"))
    copy_code = next(i for i, (k, a) in enumerate(instructions) if k == "COPY" and a.startswith(". "))
    # The packages every image has come before JAX_FLAVOUR, so the CPU and CUDA images share that layer,
    # and a code change reinstalls nothing.
    assert copy_lock < installs[0] < flavour < installs[1] < copy_code
    assert "pyproject.toml" in instructions[copy_lock][1]
    assert not re.search(r"apt-get install|build-essential|\bgcc\b|pip install", read("Dockerfile"))
    script = read("tools/install_locked.sh")
    assert "--require-hashes" in script  # uv itself comes from the lock's hashes
    assert re.search(r"uv sync --frozen --no-dev", script)  # exactly the lock, never re-resolved
    assert "rm -rf /tmp/uv" in script and "UV_NO_CACHE=1" in script  # no installer or cache in the image


def test_the_image_installs_no_tensorflow():
    """The image's packages, the lock's run closure plus a CUDA extra, hold no TensorFlow (the `tfds` extra)."""
    import tomllib

    with open(os.path.join(REPO_ROOT, "uv.lock"), "rb") as f:
        packages = {p["name"]: p for p in tomllib.load(f)["package"]}
    project = packages["mnist-flax"]
    wanted = [d["name"] for d in project["dependencies"]]
    wanted += [d["name"] for extra in ("cuda12", "cuda13") for d in project["optional-dependencies"][extra]]
    assert "tensorflow-cpu" in [d["name"] for d in project["optional-dependencies"]["tfds"]]
    closure: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name not in closure:
            closure.add(name)
            package = packages[name]
            wanted += [d["name"] for d in package.get("dependencies", [])]
            wanted += [d["name"] for group in package.get("optional-dependencies", {}).values() for d in group]
    assert "tensorboard" in closure and "tensorflow-datasets" in closure
    assert not {name for name in closure if name.startswith(("tensorflow-cpu", "tensorflow-io", "keras"))}
    assert "tensorflow" not in closure
    # Only the CUDA extras are ever passed to the install, and the build checks TensorFlow is absent.
    runs = [a for k, a in dockerfile_instructions() if k == "RUN"]
    assert not any("tfds" in a for a in runs)
    assert any("find_spec('tensorflow') is None" in a for a in runs)


def test_git_commit_goes_in_at_build_time_and_no_secret_does():
    instructions = dockerfile_instructions()
    assert any(k == "ARG" and a.startswith("GIT_COMMIT") for k, a in instructions)
    env = " ".join(a for k, a in instructions if k == "ENV")
    assert "MNIST_FLAX_GIT_COMMIT=$GIT_COMMIT" in env
    for keyword, arguments in instructions:
        if keyword in ("ARG", "ENV"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + arguments) or [arguments.split("=")[0]]
            assert not any(secret in name.upper() for name in names for secret in SECRET_NAMES), arguments
        if keyword in ("COPY", "ADD"):
            assert ".env" not in arguments


# -- .dockerignore -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".env.local",
        ".git/config",
        ".git/objects/ab/cdef",
        "runs/cnn-20260101-000000/config.json",
        "wandb/offline-run-20260101_000000-abc/run-abc.wandb",
        "notebooks/wandb/debug.log",
        "data/train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte",
        "configs/t10k-images-idx3-ubyte.gz",
        "launch/.env",
        "mnist_flax/.mypy_cache/x",
        "mnist_flax/__pycache__/train.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/content",
        "notebooks/_build/index.html",
        "notebooks/.ipynb_checkpoints/x.ipynb",
        "benchmarks/_work/result.json",
        "tests/conftest.py",
    ],
)
def test_dockerignore_keeps_out(path):
    assert dockerignore_excludes(path)


@pytest.mark.parametrize(
    "path",
    ["main.py", "mnist_flax/training/loop.py", "configs/cnn.py", "pyproject.toml", "uv.lock", "entrypoint.sh"]
    + ["launch/sweep.yaml", ".env.example", "notebooks/quickstart.ipynb", "tools/install_locked.sh"],
)
def test_dockerignore_keeps_what_the_image_needs(path):
    assert not dockerignore_excludes(path)


# -- shell scripts -------------------------------------------------------------------------


def test_shell_scripts_pass_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck is missing: apt-get install shellcheck"
    result = subprocess.run(
        ["shellcheck", "-x", *SHELL_SCRIPTS], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SHELL_SCRIPTS:
        text = read(script)
        if script != "launch/wandb_env.sh":  # sourced, not run
            assert "set -euo pipefail" in text, script
            assert os.access(os.path.join(REPO_ROOT, script), os.X_OK), f"{script} is not executable"


def write_stub(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def recorded_calls(log) -> list[list[str]]:
    """The calls a stub recorded: one per line, arguments separated by NUL bytes."""
    return [line.split("\0")[:-1] for line in log.read_text().splitlines()]


def test_docker_run_builds_with_the_commit_and_mounts_everything(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "docker.log"
    write_stub(stubs, "docker", f'for a in "$@"; do printf "%s\\0" "$a"; done >> {log}; echo >> {log}\n')
    env_file = tmp_path / "secrets.env"
    env_file.write_text("WANDB_API_KEY=fake0token0never0on0argv\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "data").mkdir()
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "DOCKER": str(stubs / "docker"),
        "JAX_FLAVOUR": "cuda12",
        "ENV_FILE": str(env_file),
        "RUNS_DIR": str(tmp_path / "runs"),
        "DATA_DIR": str(tmp_path / "data"),
        "MNIST_FLAX_PROCESS_ID": "1",
    }
    arguments = ["--config=configs/mlp.py", "--config.wandb.notes=two words"]
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "launch", "docker_run.sh"), *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    build, run = recorded_calls(log)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert build[0] == "build" and build[-1] == "."
    assert f"GIT_COMMIT={commit.strip()}" in build and "JAX_FLAVOUR=cuda12" in build
    assert run[0] == "run"
    image = run.index("mnist-flax:cuda12")
    options, command = run[:image], run[image + 1 :]
    assert command == ["python", "main.py", *arguments]  # arguments intact, spaces included
    assert "--gpus" in options and options[options.index("--gpus") + 1] == "all"
    assert options[options.index("--env-file") + 1] == str(env_file)
    assert f"{tmp_path / 'runs'}:/runs" in options and f"{tmp_path / 'data'}:/data:ro" in options
    assert options[options.index("-e") + 1] == "MNIST_FLAX_PROCESS_ID"  # by name: the value stays in env
    assert "fake0token0never0on0argv" not in log.read_text()

    env.update(JAX_FLAVOUR="cpu", BUILD="0")
    log.unlink()
    subprocess.run(["bash", os.path.join(REPO_ROOT, "launch", "docker_run.sh"), "bash", "-c", "echo hi"], env=env)
    (run,) = recorded_calls(log)  # no build this time
    assert "--gpus" not in run and run[-4:] == ["mnist-flax:cpu", "bash", "-c", "echo hi"]


@pytest.mark.parametrize("gpu", [False, True])
def test_docker_run_picks_the_cuda_image_only_where_a_gpu_answers(tmp_path, gpu):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "docker.log"
    write_stub(stubs, "docker", f'for a in "$@"; do printf "%s\\0" "$a"; done >> {log}; echo >> {log}\n')
    # nvidia-smi as a machine without a driver has it (installed, failing) or with one (listing a GPU).
    write_stub(stubs, "nvidia-smi", 'echo "GPU 0: NVIDIA H200"\n' if gpu else 'echo "no driver" >&2; exit 9\n')
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "DOCKER": str(stubs / "docker")}
    env.update(BUILD="0", RUNS_DIR=str(tmp_path / "runs"), ENV_FILE=str(tmp_path / "none.env"))
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "launch", "docker_run.sh"), "--config=configs/mlp.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (run,) = recorded_calls(log)
    assert ("mnist-flax:cuda12" in run) == gpu and ("mnist-flax:cpu" in run) != gpu
    assert ("--gpus" in run) == gpu


def test_slurm_script_gives_each_process_its_place(tmp_path):
    """Stand-ins for what a one-node cluster cannot show: two host names (the coordinator is the first).

    tests/test_slurm.py runs this script on a real Slurm cluster, with one node, no GPUs and no Apptainer.
    """
    stubs = tmp_path / "bin"
    stubs.mkdir()
    write_stub(stubs, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"\n')
    # srun: start the task command once per task, as Slurm would, with SLURM_PROCID set.
    write_stub(
        stubs,
        "srun",
        'while [[ "$1" == --* ]]; do shift; done\n'
        'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit 1; done\n',
    )
    write_stub(
        stubs,
        "python",
        'printf "%s|%s|%s|%s\\n" "$MNIST_FLAX_COORDINATOR" "$MNIST_FLAX_NUM_PROCESSES" "$MNIST_FLAX_PROCESS_ID"'
        ' "$*" >> "$SLURM_SUBMIT_DIR/calls.log"\n',
    )
    submit_dir = tmp_path / "submit"
    shutil.copytree(os.path.join(REPO_ROOT, "launch"), submit_dir / "launch")
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
    }
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "launch", "slurm.sbatch"), "--config=configs/cnn.py", "--config.x=a b"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = (submit_dir / "calls.log").read_text().splitlines()
    assert calls == [
        f"gpu-node-07:12355|2|{i}|main.py --workdir=runs/slurm-4242 --config=configs/cnn.py --config.x=a b"
        for i in range(2)
    ]
    assert (submit_dir / "runs" / "slurm-4242").is_dir()
