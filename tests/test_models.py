"""Models: output shapes, exact parameter counts, and the two convolution formulations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mnist_flax.config import schema
from mnist_flax.errors import ConfigError
from mnist_flax.training import models, resolution

# Float32 tolerances for comparing the "xla" and "shifted_matmul" convolutions.
# Both sum the same 9 * C_in products per output, in another order, so they
# differ only by rounding: measured on this machine, logits (max |logit| ~0.5)
# differ by at most 1.5e-7, and gradients by at most 1.5e-6 of the largest
# gradient of the same parameter. The tolerances leave ~10-70x margin and still
# fail for a real difference (a flipped kernel or a one-pixel shift is orders of magnitude larger).
CONV_ATOL = 1e-5
CONV_RTOL = 1e-5
# Gradients, compared per parameter relative to that parameter's largest gradient.
GRAD_RTOL = 1e-4


def model_config(config_name: str, **fields) -> ml_collections.ConfigDict:
    """The model section of configs/<config_name>.py, with fields changed, resolved for an unknown batch (no split)."""
    config = schema.load_config_file(f"configs/{config_name}.py").model
    for key, value in fields.items():
        config[key] = value
    return resolution.model(config, per_device_batch=0, backend="cpu")


def init_params(model, seed: int = 0):
    images = jnp.zeros((1, 28, 28, 1), jnp.float32)
    return jax.jit(lambda key: model.init(key, images, train=False)["params"])(jax.random.PRNGKey(seed))


def param_shapes(model):
    """The parameter tree as shapes only (jax.eval_shape: nothing is computed)."""
    images = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    return jax.eval_shape(lambda key, x: model.init(key, x, train=False)["params"], jax.random.PRNGKey(0), images)


def jit_apply(model):
    """model.apply, compiled (op-by-op dispatch of a CNN is slower than compiling it)."""
    return jax.jit(model.apply, static_argnames="train")


def random_images(batch: int, seed: int = 1) -> jax.Array:
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, 28, 28, 1), jnp.float32)


# ---------------------------------------------------------------- parameter counts

# Conv3x3 with C_in -> C_out has 3*3*C_in*C_out weights + C_out biases; every
# 2x2 average pool (VALID) halves height and width, rounding down (7 -> 3);
# Dense(n_in -> n_out) has n_in*n_out + n_out. Dropout has no parameters.
CNN_DEFAULT = (
    (3 * 3 * 1 * 32 + 32)  # conv 1: 320;         28x28x32 -> pool -> 14x14x32
    + (3 * 3 * 32 * 64 + 64)  # conv 2: 18,496;    14x14x64 -> pool -> 7x7x64 = 3136
    + (7 * 7 * 64 * 256 + 256)  # dense: 803,072
    + (256 * 10 + 10)  # head: 2,570
)
MLP_DEFAULT = (
    (28 * 28 * 512 + 512)  # 401,920
    + (512 * 256 + 256)  # 131,328
    + (256 * 10 + 10)  # 2,570
)


def test_expected_counts_arithmetic():
    # The sums above, written out, so a reader can check them by eye.
    assert CNN_DEFAULT == 320 + 18_496 + 803_072 + 2_570 == 824_458
    assert MLP_DEFAULT == 401_920 + 131_328 + 2_570 == 535_818


@pytest.mark.parametrize(
    ("name", "fields", "expected"),
    [
        ("cnn", {}, CNN_DEFAULT),
        ("mlp", {}, MLP_DEFAULT),
        # One conv stage, no hidden dense layer: 80 + 14*14*8*10 + 10.
        ("cnn", {"conv_features": (8,), "dense_features": ()}, (9 * 8 + 8) + (14 * 14 * 8 * 10 + 10)),
        # Three conv stages: 28 -> 14 -> 7 -> 3, so the dense layer sees 3*3*64 = 576 inputs.
        (
            "cnn",
            {"conv_features": (16, 32, 64), "dense_features": (128,)},
            (9 * 1 * 16 + 16) + (9 * 16 * 32 + 32) + (9 * 32 * 64 + 64) + (3 * 3 * 64 * 128 + 128) + (128 * 10 + 10),
        ),
        # Dropout adds nothing.
        ("cnn", {"dropout_rate": 0.5}, CNN_DEFAULT),
        # Logistic regression: 784*10 + 10.
        ("mlp", {"dense_features": ()}, 28 * 28 * 10 + 10),
        ("mlp", {"dense_features": (100,)}, (784 * 100 + 100) + (100 * 10 + 10)),
        ("mlp", {"dense_features": (64, 64, 64)}, (784 * 64 + 64) + 2 * (64 * 64 + 64) + (64 * 10 + 10)),
    ],
)
def test_parameter_count(name, fields, expected):
    model = models.create_model(model_config(name, **fields))
    assert models.count_params(param_shapes(model)) == expected


def test_conv_impl_does_not_change_parameter_count():
    for impl in ("xla", "shifted_matmul"):
        model = models.create_model(model_config("cnn", conv_impl=impl))
        assert models.count_params(param_shapes(model)) == CNN_DEFAULT


# ---------------------------------------------------------------- output shapes


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("batch", [1, 7])
def test_output_shape(name, batch):
    # Shapes by tracing only (jax.eval_shape compiles and computes nothing); the
    # values are checked below, for the CNN against its other formulation.
    model = models.create_model(model_config(name))
    params = param_shapes(model)
    images = jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32)
    for train in (False, True):
        logits = jax.eval_shape(
            lambda p, x, key, train=train: model.apply({"params": p}, x, train=train, rngs={"dropout": key}),
            params,
            images,
            jax.random.PRNGKey(0),
        )
        assert (logits.shape, logits.dtype) == ((batch, models.NUM_CLASSES), jnp.float32)


def test_dropout_is_active_only_in_training():
    model = models.create_model(model_config("mlp", dense_features=(32,), dropout_rate=0.5))
    params = init_params(model)
    images = random_images(4)
    apply = jit_apply(model)
    eval_a = apply({"params": params}, images, train=False)
    eval_b = apply({"params": params}, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    train_b = apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert bool(jnp.all(jnp.isfinite(train_a)))
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)


def test_parameter_tree_names_and_shapes():
    cnn = param_shapes(models.create_model(model_config("cnn")))
    shapes = {"/".join(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(cnn)}
    assert shapes == {
        "Conv3x3_0/kernel": (3, 3, 1, 32),
        "Conv3x3_0/bias": (32,),
        "Conv3x3_1/kernel": (3, 3, 32, 64),
        "Conv3x3_1/bias": (64,),
        "Dense_0/kernel": (3136, 256),
        "Dense_0/bias": (256,),
        "Dense_1/kernel": (256, 10),
        "Dense_1/bias": (10,),
    }


# ---------------------------------------------------------------- the two conv formulations


def conv3x3_reference(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """A float64 NumPy 3x3 SAME cross-correlation, written out loop by loop."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,co->nhwo", padded[:, i : i + h, j : j + w, :], kernel[i, j])
    return out


@pytest.mark.parametrize("conv", [models.conv3x3_xla, models.conv3x3_shifted_matmul])
def test_conv_matches_reference(conv):
    rng = np.random.default_rng(0)
    # Not square and not symmetric, so a transposed or flipped kernel would show.
    x = rng.normal(size=(2, 9, 7, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    got = np.asarray(conv(jnp.asarray(x), jnp.asarray(kernel)))
    np.testing.assert_allclose(got, conv3x3_reference(x.astype(np.float64), kernel.astype(np.float64)), atol=1e-4)


@pytest.fixture(scope="module")
def cnn_pair():
    """The default CNN in both formulations, and each one's parameters from the same key."""
    xla = models.create_model(model_config("cnn", conv_impl="xla"))
    shifted = models.create_model(model_config("cnn", conv_impl="shifted_matmul"))
    assert (xla.conv_impl, shifted.conv_impl) == ("xla", "shifted_matmul")
    return xla, shifted, init_params(xla, seed=3), init_params(shifted, seed=3)


def test_conv_impls_have_the_same_parameter_tree(cnn_pair):
    _, _, params_xla, params_shifted = cnn_pair
    assert jax.tree.structure(params_xla) == jax.tree.structure(params_shifted)
    assert jax.tree.map(jnp.shape, params_xla) == jax.tree.map(jnp.shape, params_shifted)
    # Same initialisers in the same order: the same key gives the same parameters,
    # so a checkpoint of one formulation restores into the other.
    jax.tree.map(np.testing.assert_array_equal, params_xla, params_shifted)


def outputs_and_grads(model, params, images, labels):
    """Logits and the gradients of the mean cross-entropy, for `params` through `model`."""

    def loss(p):
        logits = model.apply({"params": p}, images)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def test_conv_impls_give_the_same_outputs_and_gradients(cnn_pair):
    xla, shifted, params, _ = cnn_pair
    images = random_images(8)
    labels = jnp.arange(8) % 10
    # The same params (those of the xla model) go through both formulations.
    logits_xla, grads_xla = outputs_and_grads(xla, params, images, labels)
    logits_shifted, grads_shifted = outputs_and_grads(shifted, params, images, labels)
    assert float(jnp.abs(logits_xla).max()) > 0.01  # not a vacuous comparison of zeros
    np.testing.assert_allclose(logits_xla, logits_shifted, atol=CONV_ATOL, rtol=CONV_RTOL)

    flat_xla = dict(jax.tree_util.tree_leaves_with_path(grads_xla))
    flat_shifted = dict(jax.tree_util.tree_leaves_with_path(grads_shifted))
    assert flat_xla.keys() == flat_shifted.keys()
    for path, g_xla in flat_xla.items():
        scale = float(jnp.abs(g_xla).max())
        assert scale > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(
            g_xla, flat_shifted[path], atol=GRAD_RTOL * scale, rtol=0, err_msg=jax.tree_util.keystr(path)
        )


def test_resolve_conv_impl():
    assert resolution.conv_impl("auto", backend="cpu") == "xla"
    assert resolution.conv_impl("auto", backend="gpu") == "xla"
    assert resolution.conv_impl("xla", backend="cpu") == "xla"
    assert resolution.conv_impl("shifted_matmul", backend="gpu") == "shifted_matmul"


@pytest.mark.parametrize(
    ("value", "per_device_batch", "backend", "expected"),
    [
        ("auto", 128, "cpu", 8),  # 8 pieces of 16
        ("auto", 512, "cpu", 8),  # at most 8 pieces
        ("auto", 50, "cpu", 2),  # 8 and 4 do not divide 50; 2 pieces of 25
        ("auto", 16, "cpu", 1),  # no piece smaller than 16
        ("auto", 48, "cpu", 2),  # 3 pieces of 16 would do, but the count is a power of two
        ("auto", 128, "gpu", 1),
        ("auto", 0, "cpu", 1),  # batch unknown
        ("4", 128, "gpu", 4),  # from the command line, as given
        (3, 129, "cpu", 3),
    ],
)
def test_resolve_conv_batch_split(value, per_device_batch, backend, expected):
    assert resolution.conv_batch_split(value, per_device_batch, backend) == expected


@pytest.mark.parametrize("pieces", [2, 4])
def test_batch_split_gives_the_same_outputs_and_gradients(pieces):
    """The convolutions on interleaved pieces of the batch: the same parameters, logits and gradients."""
    whole = models.create_model(model_config("cnn", conv_impl="xla", conv_batch_split="1"))
    split = models.create_model(model_config("cnn", conv_impl="xla", conv_batch_split=str(pieces)))
    assert split.conv_batch_split == pieces
    params = init_params(whole, seed=5)
    jax.tree.map(np.testing.assert_array_equal, params, init_params(split, seed=5))  # same tree, same values
    images = random_images(8)
    labels = jnp.arange(8) % 10
    logits_whole, grads_whole = outputs_and_grads(whole, params, images, labels)
    logits_split, grads_split = outputs_and_grads(split, params, images, labels)
    # Each example's logits in its own row: a wrong interleave would permute the rows.
    assert float(jnp.abs(logits_whole[0] - logits_whole[1]).max()) > 1e-3
    np.testing.assert_allclose(logits_whole, logits_split, atol=CONV_ATOL, rtol=CONV_RTOL)
    for g_whole, g_split in zip(jax.tree.leaves(grads_whole), jax.tree.leaves(grads_split), strict=True):
        scale = float(jnp.abs(g_whole).max())
        assert scale > 0
        np.testing.assert_allclose(g_whole, g_split, atol=GRAD_RTOL * scale, rtol=0)


# ---------------------------------------------------------------- errors


def test_unknown_model_name_raises_config_error():
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'resnet' \(choose from cnn, mlp\)"):
        models.create_model(model_config("cnn", name="resnet"))
    with pytest.raises(ConfigError, match="'CNN'"):
        models.create_model(model_config("mlp", name="CNN"))  # names are case-sensitive


def test_inference_form_gives_the_same_outputs():
    config = schema.load_config_file("configs/cnn.py")
    config.model.conv_impl = "shifted_matmul"
    config.model.conv_batch_split = "2"
    model = models.create_model(resolution.model(config.model, per_device_batch=0, backend="cpu"))
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    fast = models.for_inference(model)
    assert fast.conv_impl == "xla" and fast.conv_batch_split == 1
    np.testing.assert_allclose(
        fast.apply({"params": params}, images), model.apply({"params": params}, images), rtol=1e-5, atol=1e-5
    )
    mlp = models.create_model(resolution.model(schema.load_config_file("configs/mlp.py").model, 0, "cpu"))
    assert models.for_inference(mlp) is mlp
