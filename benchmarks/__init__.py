"""The benchmarks (RESULTS.md). Their runs compile as a first start does: the persistent
compilation cache is off in every process they start (MNIST_FLAX_COMPILE_CACHE), so compile times and the
whole-run figures are those of a first run."""

import os

os.environ["MNIST_FLAX_COMPILE_CACHE"] = "off"
