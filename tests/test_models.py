"""Models: the registry and its checks, output shapes, exact parameter counts, BatchNorm's state, the batch split."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_flax import datasets, models
from mnist_flax.config import schema
from mnist_flax.errors import ConfigError
from mnist_flax.training import resolution, steps

FASHION_MNIST = datasets.recorded(None, "fashion_mnist")  # the default data set: 28x28x1, 10 classes

# Float32 tolerances for the batch split: the same products summed in another order (measured: logits within
# 1.5e-7, gradients within 1.5e-6 of the largest gradient of the same parameter); a wrong interleave or a
# dropped piece is orders of magnitude larger.
ATOL = 1e-5
RTOL = 1e-5
GRAD_RTOL = 1e-4


def model_section(config_name: str, **fields) -> dict:
    """The model section of configs/<config_name>.py, with fields changed."""
    section = schema.load_config_file(f"configs/{config_name}.py").model.to_dict()
    return {**section, **fields}


def create(config_name: str, num_classes: int = 10, **fields):
    return models.create(model_section(config_name, **fields), num_classes)


def init_variables(model, seed: int = 0) -> dict:
    images = jnp.zeros((1, 28, 28, 1), jnp.float32)
    return dict(jax.jit(lambda key: model.init(key, images, train=False))(jax.random.PRNGKey(seed)))


def param_shapes(model):
    """The parameter tree as shapes only (jax.eval_shape: nothing is computed)."""
    images = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    return jax.eval_shape(lambda key, x: model.init(key, x, train=False)["params"], jax.random.PRNGKey(0), images)


def random_images(batch: int, seed: int = 1) -> jax.Array:
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, 28, 28, 1), jnp.float32)


# ---------------------------------------------------------------- parameter counts

# A 3x3 nn.Conv with C_in -> C_out has 3*3*C_in*C_out weights + C_out biases; every
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
    assert models.count_params(param_shapes(create(name, **fields))) == expected


# ---------------------------------------------------------------- outputs and state


@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet"])
@pytest.mark.parametrize("batch", [1, 7])
def test_output_shape_has_the_data_sets_classes(name, batch):
    model = create(name, num_classes=7)  # from the data, not the config
    variables = jax.eval_shape(lambda: init_variables(model))
    images = jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32)
    mutable = [c for c in variables if c != "params"]
    for train in (False, True):
        logits = jax.eval_shape(
            lambda v, x, key, train=train: model.apply(v, x, train=train, rngs={"dropout": key}, mutable=mutable)[0],
            variables,
            images,
            jax.random.PRNGKey(0),
        )
        assert (logits.shape, logits.dtype) == ((batch, 7), jnp.float32)


def test_dropout_is_flaxs_and_active_only_in_training():
    model = create("mlp", dense_features=(32,), dropout_rate=0.5)
    variables = init_variables(model)
    images = random_images(4)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a, eval_b = apply(variables, images, train=False), apply(variables, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    train_b = apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert bool(jnp.all(jnp.isfinite(train_a)))
    assert not np.allclose(train_a, train_b) and not np.allclose(train_a, eval_a)


def test_parameter_tree_names_and_shapes():
    cnn = param_shapes(create("cnn"))
    shapes = {"/".join(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(cnn)}
    assert shapes == {
        "Conv_0/kernel": (3, 3, 1, 32),
        "Conv_0/bias": (32,),
        "Conv_1/kernel": (3, 3, 32, 64),
        "Conv_1/bias": (64,),
        "Dense_0/kernel": (3136, 256),
        "Dense_0/bias": (256,),
        "Dense_1/kernel": (256, 10),
        "Dense_1/bias": (10,),
    }


def test_resnet_carries_batch_statistics_updated_in_training_and_used_in_evaluation():
    model = create("resnet")
    variables = init_variables(model)
    assert set(variables) == {"params", "batch_stats"}
    images = random_images(8) * 3.0 + 1.0  # far from the initial statistics (mean 0, variance 1)
    _, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
    before, after = variables["batch_stats"]["BatchNorm_0"]["mean"], updated["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(before, after)
    eval_before = model.apply(variables, images, train=False)
    eval_after = model.apply({**variables, **updated}, images, train=False)
    assert not np.allclose(eval_before, eval_after)  # evaluation normalises by the running statistics


# ---------------------------------------------------------------- the batch split (a step transformation)


def loss_and_grads(model, variables, images, labels, pieces):
    def loss(params):
        logits, _ = steps.apply_in_pieces(
            model.apply, {**variables, "params": params}, images, jax.random.PRNGKey(0), pieces
        )
        return optax_loss(logits, labels), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return logits, grads


def optax_loss(logits, labels):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("pieces", [2, 4])
def test_batch_split_gives_the_same_outputs_and_gradients(name, pieces):
    """Any model applied on interleaved pieces of the batch: the same logits, row for row, and gradients."""
    model = create(name, dropout_rate=0.0)
    variables = init_variables(model, seed=5)
    images, labels = random_images(8), jnp.arange(8) % 10
    logits_whole, grads_whole = loss_and_grads(model, variables, images, labels, 1)
    logits_split, grads_split = loss_and_grads(model, variables, images, labels, pieces)
    # Each example's logits in its own row: a wrong interleave would permute the rows.
    assert float(jnp.abs(logits_whole[0] - logits_whole[1]).max()) > 1e-3
    np.testing.assert_allclose(logits_whole, logits_split, atol=ATOL, rtol=RTOL)
    for g_whole, g_split in zip(jax.tree.leaves(grads_whole), jax.tree.leaves(grads_split), strict=True):
        scale = float(jnp.abs(g_whole).max())
        assert scale > 0
        np.testing.assert_allclose(g_whole, g_split, atol=GRAD_RTOL * scale, rtol=0)


def test_batch_split_keeps_the_dense_layers_dropout_masks():
    """The dense head runs on the whole batch, so its dropout draws the masks of the unsplit model."""
    model = create("cnn", dropout_rate=0.5)
    variables = init_variables(model, seed=5)
    images = random_images(8)
    whole, _ = steps.apply_in_pieces(model.apply, variables, images, jax.random.PRNGKey(3), 1)
    split, _ = steps.apply_in_pieces(model.apply, variables, images, jax.random.PRNGKey(3), 4)
    other_key, _ = steps.apply_in_pieces(model.apply, variables, images, jax.random.PRNGKey(4), 4)
    np.testing.assert_allclose(whole, split, atol=ATOL, rtol=RTOL)
    assert float(jnp.abs(split - other_key).max()) > 1e-3  # dropout is on: another key, other masks


def test_batch_split_of_a_model_without_a_dense_layer_is_the_whole_batch():
    class Pooled(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Conv(10, (3, 3))(x).mean(axis=(1, 2))

    model = Pooled()
    variables = model.init(jax.random.PRNGKey(0), random_images(1))
    images = random_images(8)
    whole, _ = steps.apply_in_pieces(model.apply, variables, images, jax.random.PRNGKey(0), 1)
    split, _ = steps.apply_in_pieces(model.apply, variables, images, jax.random.PRNGKey(0), 4)
    np.testing.assert_array_equal(whole, split)


def test_a_split_of_a_stateful_models_batch_is_refused():
    with pytest.raises(ConfigError, match="train.batch_split: 2 pieces, but the model has state"):
        resolution.batch_split(2, 128, "cpu", stateful=True)
    config = schema.load_config_file("configs/resnet.py")
    config.wandb.mode = "disabled"
    config.train.batch_split = "2"
    with pytest.raises(ConfigError, match="BatchNorm"):
        resolution.resolve(config, FASHION_MNIST, backend="cpu", num_devices=1)


@pytest.mark.parametrize(
    ("value", "per_device_batch", "backend", "stateful", "expected"),
    [
        ("auto", 128, "cpu", False, 8),  # 8 pieces of 16
        ("auto", 512, "cpu", False, 8),  # at most 8 pieces
        ("auto", 50, "cpu", False, 2),  # 8 and 4 do not divide 50; 2 pieces of 25
        ("auto", 16, "cpu", False, 1),  # no piece smaller than 16
        ("auto", 48, "cpu", False, 2),  # 3 pieces of 16 would do, but the count is a power of two
        ("auto", 128, "gpu", False, 1),
        ("auto", 0, "cpu", False, 1),  # batch unknown
        ("auto", 128, "cpu", True, 1),  # BatchNorm: the batch's statistics, not a piece's
        ("4", 128, "gpu", False, 4),  # from the command line, as given
        (3, 129, "cpu", False, 3),
        (1, 128, "cpu", True, 1),
    ],
)
def test_resolve_batch_split(value, per_device_batch, backend, stateful, expected):
    assert resolution.batch_split(value, per_device_batch, backend, stateful) == expected


def test_resolution_splits_the_cnn_and_not_the_resnet():
    for name, pieces in (("cnn", 8), ("resnet", 1)):
        config = schema.load_config_file(f"configs/{name}.py")
        config.wandb.mode = "disabled"
        assert resolution.resolve(config, FASHION_MNIST, backend="cpu", num_devices=1).train.batch_split == pieces


# ---------------------------------------------------------------- the registry and bad input


def test_the_registered_models_are_the_modules_of_the_package():
    assert {"cnn", "mlp", "resnet"} <= set(models.registered())
    assert models.fields("cnn") == ["conv_features", "dense_features", "dropout_rate"]  # the dataclass fields
    assert models.fields("resnet") == ["stage_features", "blocks_per_stage"]


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"^model\.name: unknown model 'vit' \(registered: cnn, mlp, resnet"):
        create("cnn", name="vit")
    with pytest.raises(ConfigError, match="'CNN'"):
        create("mlp", name="CNN")  # names are case-sensitive


def test_a_field_no_model_declares_is_refused_naming_the_models_fields():
    with pytest.raises(
        ConfigError,
        match=r"^model\.dense_feature: the mlp model has no field 'dense_feature' \(its fields: "
        r"dense_features, dropout_rate\)$",
    ):
        models.check({"name": "mlp", "dense_feature": (3,)})
    with pytest.raises(ConfigError, match=r"^model\.num_classes: comes from the data set"):
        models.check({"name": "mlp", "num_classes": 3})
    with pytest.raises(ConfigError, match=r"^model\.conv_impl: no longer a model field"):
        models.check({"name": "cnn", "conv_impl": "xla"})


def test_own_fields_leave_out_another_models_and_retired_fields():
    # configs/cnn.py with model.name=mlp (a sweep over architectures): the run records the MLP's own fields.
    assert models.own_fields(model_section("cnn", name="mlp")) == {
        "name": "mlp",
        "dense_features": (256,),
        "dropout_rate": 0.25,
    }
    # An older run's recorded CNN (conv_impl, conv_batch_split) is read back as the CNN it was.
    old = {**model_section("cnn"), "conv_impl": "xla", "conv_batch_split": 8}
    assert models.create(old, 10) == create("cnn")
