"""The conditioning classifier on synthetic features with known classes; no network weights are loaded."""

from __future__ import annotations

import numpy as np
import pytest

from mrgen_dist.eval.conditioning import CLASSIFIER, L2, fit_classifier, synthetic_trained_accuracy


def _classes(n_per_class: int, d: int, seed: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(42).standard_normal((3, d)) * separation
    labels = np.repeat(np.arange(3), n_per_class)
    scale = np.random.default_rng(43).uniform(0.1, 50, d)  # very different feature scales: standardised first
    return (centres[labels] + rng.standard_normal((len(labels), d))) * scale, labels


def test_standardised_multinomial_logistic_regression() -> None:
    x, y = _classes(40, 64, seed=0, separation=1.0)
    classifier = fit_classifier(x, y)
    scaler, logistic = (step for _, step in classifier.steps)
    assert type(scaler).__name__ == "StandardScaler" and type(logistic).__name__ == "LogisticRegression"
    assert logistic.coef_.shape == (3, 64)  # one weight vector per class: softmax over 3 scanners
    assert logistic.C == pytest.approx(1 / (2 * L2 * len(x)))  # mean cross-entropy + L2 ||W||²
    x_test, y_test = _classes(40, 64, seed=1, separation=1.0)
    assert (classifier.predict(x_test) == y_test).mean() >= 0.9
    again = fit_classifier(x, y)
    np.testing.assert_array_equal(again.predict(x_test), classifier.predict(x_test))  # deterministic
    assert "logistic regression" in CLASSIFIER and "standardised" in CLASSIFIER


def test_indistinguishable_classes_are_near_chance() -> None:
    x, y = _classes(60, 32, seed=2, separation=0.0)
    x_test, y_test = _classes(200, 32, seed=3, separation=0.0)
    accuracy = (fit_classifier(x, y).predict(x_test) == y_test).mean()
    assert accuracy < 0.5  # chance is 1/3


def test_train_on_synthetic_test_on_real() -> None:
    """Generated sets that carry each class's traits train a classifier of the real ones; sets that swap two
    classes' traits train one that confuses them."""
    x, y = _classes(60, 32, seed=4, separation=1.0)
    real, _ = _classes(60, 32, seed=5, separation=1.0)
    generated = [x[y == k] for k in range(3)]
    real_test = [real[np.repeat(np.arange(3), 60) == k] for k in range(3)]
    assert synthetic_trained_accuracy(generated, real_test, [0, 1, 2]) >= 0.9
    swapped = [generated[1], generated[0], generated[2]]
    assert synthetic_trained_accuracy(swapped, real_test, [0, 1, 2]) <= 0.5
