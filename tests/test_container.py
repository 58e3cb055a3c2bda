"""The image, really built and run: the CPU variant, a tiny training, what it wrote.

Needs root and Debian's docker.io and debootstrap packages. The Docker daemon is
started here if none is running, and that daemon (only that one) is stopped at
the end, by its PID. The base image comes from .ci/docker_base.sh (debootstrap,
no registry) and is reused when it exists; MNIST_FLAX_BASE_IMAGE names another.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import tomllib

import pytest
import services
from conftest import REPO_ROOT, tiny_overrides, write_idx_dataset

from mnist_flax import layout
from mnist_flax.commands import diff

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

BASE_IMAGE = os.environ.get("MNIST_FLAX_BASE_IMAGE", "mnist-flax-ci-base:bookworm")
IMAGE = "mnist-flax:test-cpu"
CUDA_IMAGE = "mnist-flax:test-cuda12"
FAKE_TOKEN = "fake0container0token0" + "9" * 19
# The legacy builder: it needs no buildx plugin, and the Dockerfile needs nothing newer.
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}


def docker(*args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, env=DOCKER_ENV, **kwargs
    )
    if check:
        assert result.returncode == 0, f"docker {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def daemon_answers() -> bool:
    return docker("info", check=False, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory):
    """A running Docker daemon; started (and later stopped) here when there is none."""
    assert shutil.which("docker") and shutil.which("dockerd"), "Docker is missing: apt-get install docker.io"
    if daemon_answers():
        yield
        return
    assert os.geteuid() == 0, "starting dockerd needs root"
    log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "w")
    daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not daemon_answers():
            assert daemon.poll() is None, f"dockerd exited with status {daemon.returncode}; see {log.name}"
            assert time.monotonic() < deadline, f"dockerd did not answer within 60 s; see {log.name}"
            time.sleep(0.5)
        yield
    finally:
        services.stop(daemon, timeout=60)  # only the daemon this fixture started, by its PID
        log.close()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def image(docker_daemon, tmp_path_factory):
    """The CPU image, built on the debootstrap base with this checkout's commit."""
    base = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, ".ci", "docker_base.sh"), BASE_IMAGE],
        capture_output=True,
        text=True,
        timeout=900,
        env=DOCKER_ENV,
    )
    assert base.returncode == 0, base.stdout + base.stderr
    log = tmp_path_factory.mktemp("build") / "build.log"
    with open(log, "w") as f:
        build = subprocess.run(
            ["docker", "build", "-t", IMAGE, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
            + ["--build-arg", "JAX_FLAVOUR=cpu", "--build-arg", f"GIT_COMMIT={git('rev-parse', 'HEAD')}"]
            + ["--build-arg", f"GIT_BRANCH={git('rev-parse', '--abbrev-ref', 'HEAD')}", REPO_ROOT],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=1500,
            env=DOCKER_ENV,
        )
    assert build.returncode == 0, f"docker build failed:\n{log.read_text()[-4000:]}"
    return IMAGE


def test_image_runs_as_non_root_without_secrets_or_git(image, tmp_path):
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] not in ("", "root", "0")
    assert config["Entrypoint"] == ["/app/entrypoint.sh"]
    assert "main.py" in config["Cmd"]
    env_file = tmp_path / "test.env"
    env_file.write_text(f"WANDB_TOKEN={FAKE_TOKEN}\nWANDB_MODE=offline\n")
    probe = (
        "import hashlib, json, os; "
        "print(json.dumps({'uid': os.getuid(), 'commit': os.environ.get('MNIST_FLAX_GIT_COMMIT'), "
        "'key': hashlib.sha256(os.environ.get('WANDB_API_KEY', '').encode()).hexdigest(), "
        "'app': sorted(os.listdir('/app'))}))"
    )
    result = docker("run", "--rm", "--env-file", str(env_file), image, "python", "-c", probe, timeout=120)
    seen = json.loads(result.stdout)
    assert seen["uid"] != 0
    assert seen["commit"] == git("rev-parse", "HEAD")
    assert seen["key"] == hashlib.sha256(FAKE_TOKEN.encode()).hexdigest()  # WANDB_TOKEN became WANDB_API_KEY
    assert {"main.py", "mnist_flax", "configs", "entrypoint.sh"} <= set(seen["app"])
    assert not {".env", ".git", "tests", "wandb"} & set(seen["app"])
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_tiny_training_in_the_container(image, tmp_path):
    data = write_idx_dataset(str(tmp_path / "data"))
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # writable by the image's user, whatever its uid
    env_file = tmp_path / "test.env"
    env_file.write_text(f"# a fake token: the run is offline\nWANDB_TOKEN={FAKE_TOKEN}\nWANDB_MODE=offline\n")
    result = docker(
        "run",
        "--rm",
        "--env-file",
        str(env_file),
        "-v",
        f"{runs}:/runs",
        "-v",
        f"{data}:/data:ro",
        image,
        "python",
        "main.py",
        "--config=configs/mlp.py",
        "--workdir=/runs/tiny",
        *tiny_overrides("/data"),
        "--config.wandb.notes=trained in a container",
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert FAKE_TOKEN not in output

    workdir = runs / "tiny"
    config = diff.load_flat(str(workdir))
    assert config["model.name"] == "mlp" and config["data.local_dir"] == "/data"
    assert config["wandb.notes"] == "trained in a container"  # an argument with spaces arrived whole
    metrics = [json.loads(line) for line in (workdir / layout.METRICS).read_text().splitlines()]
    assert metrics
    final = json.loads((workdir / layout.FINAL_METRICS).read_text())
    assert final["test"]["accuracy"] > 0.5  # the synthetic set is easy to learn
    assert final["git"]["commit"] == git("rev-parse", "HEAD")  # the commit the image was built from
    assert glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))
    steps = [name for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
    assert steps
    assert os.stat(workdir / layout.CONFIG).st_uid != 0  # written by the non-root user

    for path in workdir.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), f"the token leaked into {path}"


# -- the accelerator image, and the README's first command on a bare Debian ----------------------


@pytest.fixture(scope="module")
def cuda_image(image, tmp_path_factory):
    """The CUDA 12 image: the CPU image's locked layer plus JAX's CUDA plugin and NVIDIA's wheels (gigabytes)."""
    log = str(tmp_path_factory.mktemp("build-cuda12") / "build.log")
    with open(log, "w") as f:
        build = subprocess.run(
            ["docker", "build", "-t", CUDA_IMAGE, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
            + ["--build-arg", "JAX_FLAVOUR=cuda12", "--build-arg", f"GIT_COMMIT={git('rev-parse', 'HEAD')}", REPO_ROOT],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=1500,
            env=DOCKER_ENV,
        )
    output = open(log).read()
    assert build.returncode == 0, f"docker build (cuda12) failed:\n{output[-4000:]}"
    # The packages every image has are one layer, built once for both images.
    assert re.search(r"install_locked\.sh /tmp/lock\s*&&[^\n]*\n ---> Using cache", output), output[-4000:]
    return CUDA_IMAGE


def test_the_cuda_image_trains_on_the_cpu_where_there_is_no_gpu_and_says_so(cuda_image, tmp_path):
    data = write_idx_dataset(str(tmp_path / "data"))
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)
    result = docker(
        "run",
        "--rm",
        "-e",
        "WANDB_MODE=offline",
        "-v",
        f"{runs}:/runs",
        "-v",
        f"{data}:/data:ro",
        cuda_image,
        "python",
        "main.py",
        "--config=configs/mlp.py",
        "--workdir=/runs/tiny",
        *tiny_overrides("/data", num_epochs=1),
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"no accelerator found: jax-cuda12-plugin {jax_pin()} is installed, but JAX sees no device" in output
    assert "cpu x1" in output and "Traceback" not in output
    final = json.loads((runs / "tiny" / layout.FINAL_METRICS).read_text())
    assert final["test"]["accuracy"] > 0.5
    sizes = {
        name: int(docker("image", "inspect", "--format", "{{.Size}}", name).stdout) for name in (IMAGE, cuda_image)
    }
    assert sizes[cuda_image] > sizes[IMAGE] + 2**30  # the CUDA wheels really are in it
    print(f"image sizes: {IMAGE} {sizes[IMAGE] / 2**30:.2f} GiB, {cuda_image} {sizes[cuda_image] / 2**30:.2f} GiB")


def jax_pin() -> str:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return next(d.split("==")[1] for d in dependencies if d.startswith("jax=="))


def test_make_train_from_a_clone_on_a_bare_debian(docker_daemon, image, tmp_path):
    """The README's first command where a newcomer's Debian 12 has nothing but python3: the CI base image.

    `image` is only asked for so that the base image exists. The clone is of this checkout's commit; make and
    git are what the README says to install first; the rest (the data, python3-venv, the locked packages) is
    make's own doing. Debian's own python3 is the interpreter, as on a stock machine.
    """
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", REPO_ROOT, str(clone)], check=True, timeout=120)
    script = (
        "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
        "apt-get install -y -qq make git >/dev/null; "
        # A stock Debian 12 has python3 without its venv module: the setup installs it.
        "apt-get purge -y -qq python3-venv python3.11-venv >/dev/null; "
        "git clone -q /src /work/clone && cd /work/clone; "
        "make train CONFIG=configs/mlp.py ARGS='--config.num_epochs=1 --config.data.train_subset=5000 "
        "--config.data.eval_subset=1000 --config.wandb.mode=offline --config.tensorboard=False --workdir=runs/first'; "
        "test ! -e /usr/lib/python3/dist-packages/jax && .venv/bin/python -c 'import sys; print(sys.base_prefix)'"
    )
    result = docker("run", "--rm", "-v", f"{clone}:/src:ro", BASE_IMAGE, "bash", "-c", script, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "setup: /usr/bin/python3 has no venv module; installing Debian's python3-venv" in output
    assert "setup: making .venv with /usr/bin/python3 (Python 3.11)" in output
    assert "setup: .venv synced from uv.lock" in output
    assert "test: accuracy" in output and "workdir: /work/clone/runs/first" in output
    assert result.stdout.strip().splitlines()[-1] == "/usr"  # the venv is Debian's own Python's
