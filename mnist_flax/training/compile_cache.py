"""JAX's persistent compilation cache: XLA's compiled programs kept across runs, so a second start compiles nothing.

On by default (`compile_cache="auto"`): the second run of a config, a resume, a reproduction and every sweep
trial of one shape load their programs from the cache instead of compiling them. The cache is keyed by the
program, the backend, JAX's version and XLA's flags, so a changed model or flag compiles anew; what is loaded
is the program that would have been compiled, so the numbers are the same.
"""

import os

import jax

OFF = ("off", "none", "")
ENV = "MNIST_FLAX_COMPILE_CACHE"  # what "auto" means on this machine: a folder, or "off"


def location(value: str) -> str | None:
    """The cache's folder for the config's `compile_cache`; None for no cache.

    "auto" is $MNIST_FLAX_COMPILE_CACHE (a folder, or "off"), else $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/mnist_flax/xla (~/.cache/mnist_flax/xla); "off" (or "") is none; anything else a folder.
    """
    if value in ("default", "auto") and os.environ.get(ENV) is not None:
        value = os.environ[ENV]
    if value.strip().lower() in OFF:
        return None
    if value in ("default", "auto"):
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return os.environ["JAX_COMPILATION_CACHE_DIR"]
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "mnist_flax", "xla")
    return os.path.abspath(os.path.expanduser(value))


def enable(value: str) -> str | None:
    """Points JAX's persistent cache at `location(value)` (before anything compiles); returns the folder.

    Every program is cached, however fast it compiled: the small ones add up at start-up. A folder that
    cannot be made leaves the cache off (the run compiles as without one) rather than stopping it.
    """
    folder = location(value)
    if folder is not None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            folder = None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
