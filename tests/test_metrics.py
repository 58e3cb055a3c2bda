"""Metrics: the evaluation report against scikit-learn, AUROC with ties, merged train metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

from mnist_flax.training import metrics

NUM_CLASSES = 10


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def tied_log_probs(num: int, seed: int, num_patterns: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities with many ties, and labels that they predict better than chance.

    Each example's logits are one of `num_patterns` rows of small integers, so a
    class's score takes few distinct values (ties for AUROC) and a row often has
    two equal best scores (ties in the argmax).
    """
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 3, size=(num_patterns, NUM_CLASSES)).astype(np.float64)
    logits = patterns[rng.integers(0, num_patterns, size=num)]
    # Labels follow the logits half of the time, so the metrics are not all at chance.
    predicted = np.array([rng.choice(np.flatnonzero(row == row.max())) for row in logits])
    labels = np.where(rng.random(num) < 0.5, predicted, rng.integers(0, NUM_CLASSES, size=num))
    return log_softmax(logits), labels


def assert_matches_sklearn(log_probs: np.ndarray, labels: np.ndarray, report: dict) -> None:
    """Every entry of `report` against scikit-learn, over the classes present in `labels`."""
    probs = np.exp(log_probs)
    predictions = log_probs.argmax(axis=1)
    all_classes = list(range(NUM_CLASSES))
    present = np.unique(labels)

    assert report["num_examples"] == len(labels)
    assert report["accuracy"] == pytest.approx(sk.accuracy_score(labels, predictions), abs=1e-12)
    assert report["loss"] == pytest.approx(sk.log_loss(labels, probs, labels=all_classes), rel=1e-9)
    assert report["confusion_matrix"] == sk.confusion_matrix(labels, predictions, labels=all_classes).tolist()

    # Per class over all ten classes; a class never predicted (or never present) scores 0.
    per_class = report["per_class"]
    for name, fn in (("precision", sk.precision_score), ("recall", sk.recall_score), ("f1", sk.f1_score)):
        expected = fn(labels, predictions, labels=all_classes, average=None, zero_division=0)
        np.testing.assert_allclose(per_class[name], expected, rtol=0, atol=1e-12, err_msg=name)
        # Macro: the mean over the classes that occur in the labels.
        expected_macro = fn(labels, predictions, labels=present, average="macro", zero_division=0)
        assert report[f"{name}_macro"] == pytest.approx(expected_macro, abs=1e-12), name

    # One-vs-rest AUROC per class, NaN for a class absent from the labels; macro over the rest.
    for c in all_classes:
        if c in present:
            assert per_class["auroc"][c] == pytest.approx(sk.roc_auc_score(labels == c, probs[:, c]), abs=1e-12)
        else:
            assert np.isnan(per_class["auroc"][c])
    if len(present) == NUM_CLASSES:
        expected_auroc = sk.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    else:
        expected_auroc = np.mean([sk.roc_auc_score(labels == c, probs[:, c]) for c in present])
    assert report["auroc_macro"] == pytest.approx(expected_auroc, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed):
    log_probs, labels = tied_log_probs(500, seed)
    assert len(np.unique(labels)) == NUM_CLASSES
    # The data really has ties, in the scores of a class and in the best score of an example.
    assert len(np.unique(log_probs[:, 0])) < 50
    top_two = np.sort(log_probs, axis=1)[:, -2:]
    assert (top_two[:, 0] == top_two[:, 1]).any()
    report = metrics.classification_metrics(log_probs, labels)
    assert 0.15 < report["accuracy"] < 0.9  # above chance (0.1), not perfect
    assert_matches_sklearn(log_probs, labels, report)


def test_class_never_predicted():
    log_probs, labels = tied_log_probs(400, seed=3)
    # Class 7 is present in the labels but never predicted. (Not below sklearn's
    # log_loss clipping at float64 eps: e**-20 = 2e-9 is far above it.)
    log_probs[:, 7] = -20.0
    log_probs = log_softmax(log_probs)
    assert 7 in labels and 7 not in log_probs.argmax(axis=1)
    report = metrics.classification_metrics(log_probs, labels)
    assert report["per_class"]["precision"][7] == 0.0
    assert report["per_class"]["recall"][7] == 0.0
    assert report["per_class"]["f1"][7] == 0.0
    assert [row[7] for row in report["confusion_matrix"]] == [0] * NUM_CLASSES
    assert_matches_sklearn(log_probs, labels, report)


def test_class_absent_from_labels():
    # Class 3 is predicted but never true (e.g. a small eval subset): it has no
    # recall or AUROC, and the macro averages are over the nine classes present.
    log_probs, labels = tied_log_probs(400, seed=4)
    labels[labels == 3] = 4
    log_probs[:5, 3] = 10.0
    log_probs = log_softmax(log_probs)
    report = metrics.classification_metrics(log_probs, labels)
    assert np.isnan(report["per_class"]["auroc"][3])
    assert report["per_class"]["precision"][3] == 0.0
    assert not np.isnan(report["auroc_macro"])
    assert_matches_sklearn(log_probs, labels, report)


def test_perfect_and_confident_predictions():
    labels = np.arange(20) % NUM_CLASSES
    log_probs = log_softmax(np.eye(NUM_CLASSES)[labels] * 30.0)
    report = metrics.classification_metrics(log_probs, labels)
    assert report["accuracy"] == 1.0 and report["f1_macro"] == 1.0 and report["auroc_macro"] == 1.0
    assert report["loss"] == pytest.approx(0.0, abs=1e-10)
    assert report["confusion_matrix"] == (2 * np.eye(NUM_CLASSES, dtype=int)).tolist()


def test_classification_metrics_accepts_float32():
    # Evaluation passes the model's float32 log-probabilities straight in.
    log_probs, labels = tied_log_probs(200, seed=5)
    report32 = metrics.classification_metrics(log_probs.astype(np.float32), labels.astype(np.int32))
    report64 = metrics.classification_metrics(log_probs, labels)
    assert report32["confusion_matrix"] == report64["confusion_matrix"]
    assert report32["loss"] == pytest.approx(report64["loss"], rel=1e-6)


# ---------------------------------------------------------------- binary AUROC


@pytest.mark.parametrize("seed", range(5))
def test_binary_auroc_with_ties_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=300) / 3.0  # four distinct values: ties everywhere
    positives = rng.random(300) < 0.3 + 0.2 * scores  # informative, not perfect
    got = metrics.binary_auroc(scores, positives)
    assert got == pytest.approx(sk.roc_auc_score(positives, scores), abs=1e-12)
    assert 0.5 < got < 1.0


def test_binary_auroc_small_cases():
    # All scores tied: 0.5. Perfectly separated: 1. Reversed: 0. One tie across classes: 0.5 of that pair.
    assert metrics.binary_auroc(np.zeros(4), np.array([True, False, True, False])) == 0.5
    assert metrics.binary_auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])) == 1.0
    assert metrics.binary_auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([True, True, False, False])) == 0.0
    # Pairs (pos, neg): (0.5, 0.1) win, (0.5, 0.5) tie -> (1 + 0.5) / 2.
    assert metrics.binary_auroc(np.array([0.5, 0.1, 0.5]), np.array([True, False, False])) == 0.75


def test_binary_auroc_one_class_absent_is_nan():
    assert np.isnan(metrics.binary_auroc(np.array([0.2, 0.7]), np.array([True, True])))
    assert np.isnan(metrics.binary_auroc(np.array([0.2, 0.7]), np.array([False, False])))


def test_rankdata_matches_scipy():
    values = np.random.default_rng(0).integers(0, 7, size=200).astype(np.float64)
    np.testing.assert_array_equal(metrics._rankdata(values), stats.rankdata(values))


# ---------------------------------------------------------------- train metrics


def batch_metrics(loss: float, logits: list[list[float]], labels: list[int]) -> metrics.TrainMetrics:
    return metrics.TrainMetrics.single_from_model_output(
        loss=jnp.asarray(loss), logits=jnp.asarray(logits), labels=jnp.asarray(labels)
    )


def test_train_metrics_merge():
    # Batch 1: 4 examples, 3 right. Batch 2: 2 examples, 0 right.
    first = batch_metrics(0.8, [[2, 0], [0, 2], [2, 0], [0, 2]], [0, 1, 0, 0])
    second = batch_metrics(2.0, [[2, 0], [0, 2]], [1, 0])
    assert first.compute()["accuracy"] == pytest.approx(0.75)
    merged = metrics.TrainMetrics.empty().merge(first).merge(second).compute()
    # Loss: the mean of the per-batch mean losses (every training batch has the same size).
    assert float(merged["loss"]) == pytest.approx((0.8 + 2.0) / 2)
    # Accuracy: over examples, 3 of 6, not the mean of the batch accuracies (0.375).
    assert float(merged["accuracy"]) == pytest.approx(3 / 6)


def test_train_metrics_merge_inside_jit():
    # As in the train step: merged in a compiled function, then read at a log point.
    @jax.jit
    def merge(collection, loss, logits, labels):
        return collection.merge(metrics.TrainMetrics.single_from_model_output(loss=loss, logits=logits, labels=labels))

    collection = metrics.TrainMetrics.empty()
    losses = [1.0, 0.5, 0.25]
    for step, loss in enumerate(losses):
        logits = jnp.eye(3)[jnp.array([0, 1, 2])] * (1 if step else -1)  # step 0: all wrong
        collection = merge(collection, jnp.asarray(loss), logits, jnp.array([0, 1, 2]))
    computed = collection.compute()
    assert float(computed["loss"]) == pytest.approx(sum(losses) / 3)
    assert float(computed["accuracy"]) == pytest.approx(6 / 9)


def test_scalar_metrics_flattens_the_report():
    log_probs, labels = tied_log_probs(100, seed=6)
    report = metrics.classification_metrics(log_probs, labels)
    scalars = metrics.scalar_metrics(report, "val")
    assert scalars["val/accuracy"] == report["accuracy"]
    assert scalars["val/auroc_class_9"] == report["per_class"]["auroc"][9]
    assert all(isinstance(v, float) for v in scalars.values())
    # 6 scalars (loss, accuracy, 3 macro, auroc macro) + 4 per-class lists of 10.
    assert len(scalars) == 6 + 4 * NUM_CLASSES
    assert not any("confusion" in key or "num_examples" in key for key in scalars)
