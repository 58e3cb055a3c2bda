# The training image: this repository on Python 3.11 with the packages of uv.lock.
#
#   docker build -t mnist-flax --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .              # GPU (CUDA 12)
#   docker build -t mnist-flax:cpu --build-arg JAX_FLAVOUR=cpu --build-arg GIT_COMMIT=... .  # CPU only
#
# launch/docker_run.sh builds and runs it; launch/README.md has the commands.
#
# BASE_IMAGE: any Debian-like image whose `python3` is 3.11 with the venv module
# (python:3.11-slim-bookworm, or Debian bookworm with python3-venv). JAX's CUDA
# wheels carry CUDA and cuDNN themselves, so the GPU image needs no CUDA base:
# the host needs only the NVIDIA driver and the container toolkit (--gpus all).
# JAX_FLAVOUR: cpu, cuda12 or cuda13 (pyproject.toml's extra of that name, locked in
# uv.lock: `jax[cudaNN]` at the same jax version).
#
# Small without a second stage: the base has no compiler and none is installed
# (every locked package is a wheel), no installer or cache stays in the image,
# and the code is the last layer, so a code change rebuilds only that layer.
# No secret is baked in: the W&B token comes at run time (docker run --env-file .env).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG APP_UID=1000
# /runs (workdirs) and /data (IDX files) are meant to be mounted; /app/runs
# points at /runs, so main.py's default workdir lands in the mounted folder.
RUN useradd --create-home --uid "$APP_UID" --user-group --shell /bin/bash app \
 && mkdir -p /runs /data /app \
 && chown app:app /runs \
 && ln -s /runs /app/runs

# The locked environment (uv.lock, the same lock as `make setup`'s .venv), in two layers: the packages every
# image has, then the accelerator's (JAX's CUDA plugin and NVIDIA's wheels), so the CPU and CUDA images share
# the first. tools/install_locked.sh bootstraps uv from the lock's hashes and leaves no installer behind.
# No TensorFlow: it is in pyproject.toml's `tfds` extra, which no image installs (a run needs it only to load
# a data set through TFDS; the image trains on IDX files mounted at /data), and the build checks it is absent.
COPY pyproject.toml uv.lock tools/uv_requirement.py tools/install_locked.sh /tmp/lock/
RUN bash /tmp/lock/install_locked.sh /tmp/lock \
 && /opt/venv/bin/python -c "import jax, flax, optax, orbax.checkpoint, clu, wandb, tensorboard, tensorflow_datasets" \
 && /opt/venv/bin/python -c "import importlib.util as u; assert u.find_spec('tensorflow') is None, 'TensorFlow in the image'"
ARG JAX_FLAVOUR=cuda12
RUN case "$JAX_FLAVOUR" in \
      cpu) ;; \
      cuda12|cuda13) bash /tmp/lock/install_locked.sh /tmp/lock --extra "$JAX_FLAVOUR" ;; \
      *) echo "JAX_FLAVOUR must be cpu, cuda12 or cuda13, not '$JAX_FLAVOUR'" >&2; exit 2 ;; \
    esac \
 && rm -rf /tmp/lock

# The code's git state, logged by every run from this image (mnist_flax/tracking/wandb_run.py).
ARG GIT_COMMIT=unknown
ARG GIT_BRANCH=unknown
ARG GIT_DIRTY=false
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MNIST_FLAX_JAX_FLAVOUR=$JAX_FLAVOUR \
    MNIST_FLAX_GIT_COMMIT=$GIT_COMMIT \
    MNIST_FLAX_GIT_BRANCH=$GIT_BRANCH \
    MNIST_FLAX_GIT_DIRTY=$GIT_DIRTY
LABEL org.opencontainers.image.title="mnist_flax" \
      org.opencontainers.image.revision=$GIT_COMMIT

WORKDIR /app
COPY . /app
USER app
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["python", "main.py", "--config=configs/default.py"]
