"""The conditioning classifier on synthetic features with known classes; no network weights are loaded."""

from __future__ import annotations

import numpy as np
import pytest

from mrgen_dist.eval.conditioning import CLASSIFIER, L2, fit_classifier


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
