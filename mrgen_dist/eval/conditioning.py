"""The conditioning check: are generated slices recognised as the scanner they were asked for?

A scanner classifier is fitted on Inception features of the real training slices: scikit-learn's
`LogisticRegression` (multinomial, lbfgs, L2) on features standardised by a `StandardScaler`, with a fixed
random_state. The L2 weight is 1e-3 per training slice on the weights (not the intercepts), i.e. the objective
mean cross-entropy + 1e-3 ||W||², which is scikit-learn's C = 1 / (2 · 1e-3 · n_train).

Reported (OUT/conditioning.json): the classifier's accuracy on the real test slices (how well scanners can be
told apart at all), the rate at which generated slices (`--n-generated` per scanner, default as many as its
real test slices; with `--noise` drawn with the model's learned observation noise) are recognised as the
scanner they were asked for, and the confusion matrix (rows: asked for, columns: recognised). The same sets
also give the utility measure train-on-synthetic, test-on-real: the same kind of classifier fitted on the
generated slices alone (each labelled with the scanner it was asked for) and scored on the real test slices,
which is high only when every scanner's samples carry what tells that scanner apart in real data. Per scanner,
the memorisation ratio: how near the generated slices lie to the real training slices (median nearest-neighbour
distance in Inception features) compared with the real test slices.

`scanner_classifier` gives the fitted classifier on its own: `mrgen-fid diagnose` applies it to a run's
reconstructions of the real test slices.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from mrgen_dist.cli import require
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.features import FidError, cache_dir, real_features
from mrgen_dist.eval.inception import InceptionFeatures
from mrgen_dist.eval.quality import memorisation_ratio
from mrgen_dist.eval.results import Conditioning
from mrgen_dist.runtime.sampler import Sampler

#: L2 weight per training slice (on the weights, not the intercepts).
L2 = 1e-3
RANDOM_STATE = 0
MAX_ITER = 1000
#: Run on its own (`mrgen-fid conditioning`), the check draws its sets with seed + SEED_OFFSET, apart from the FID
#: repeats' seeds; within `mrgen-fid score` it scores the first repeat's sets (seed), already through Inception.
SEED_OFFSET = 10_000
CLASSIFIER = (f"multinomial logistic regression (scikit-learn, lbfgs, L2 {L2:g} per training slice, "
              f"random_state {RANDOM_STATE}) on standardised Inception features of real train slices")


def confusion(truth: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """Counts (k, k): rows the true scanner, columns the predicted one."""
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (truth, predicted), 1)
    return counts


def fit_classifier(features: np.ndarray, labels: np.ndarray, l2: float = L2) -> Any:
    """A fitted scikit-learn Pipeline (StandardScaler, LogisticRegression): features (n, d) -> label ids."""
    linear_model = require("sklearn.linear_model", "the conditioning check")
    pipeline = require("sklearn.pipeline", "the conditioning check")
    preprocessing = require("sklearn.preprocessing", "the conditioning check")
    classifier = pipeline.make_pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(C=1.0 / (2.0 * l2 * len(features)), solver="lbfgs", max_iter=MAX_ITER,
                                        random_state=RANDOM_STATE),
    )
    return classifier.fit(features, labels)


def scanner_classifier(store: SliceStore, extractor: InceptionFeatures, cache: Path) -> Any:
    """The conditioning check's classifier, fitted on Inception features of the store's real training slices
    (cached in `cache` like every real feature set); a FidError when a scanner has no training slices."""
    vocabulary = store.vocabulary
    names = list(vocabulary.names)
    if len(names) < 2:
        raise FidError(f"the conditioning check needs at least 2 scanners; {store.root} has {names}")
    train = [real_features(store, s, "train", extractor, cache)[0] for s in names]
    empty = [name for name, f in zip(names, train, strict=True) if len(f) == 0]
    if empty:
        raise FidError(f"no real slices of {', '.join(f'{name} (train)' for name in empty)} in {store.root}; the "
                       "conditioning check needs train and test slices of every scanner")
    labels = np.concatenate([np.full(len(f), vocabulary.index(name)) for name, f in zip(names, train, strict=True)])
    return fit_classifier(np.concatenate(train), labels)


def conditioning(store: SliceStore, sampler: Sampler, extractor: InceptionFeatures, seed: int, out: Path,
                 n_generated: int | None = None, noise: bool = False, generated: dict[str, np.ndarray] | None = None
                 ) -> Conditioning:
    """Fit the classifier, score real test slices and `n_generated` generated slices per scanner (default: as
    many as its real test slices); writes and returns OUT/conditioning.json. `generated`: Inception features of
    sets already drawn (by `mrgen-fid score`'s first repeat, seed `seed`), scored instead of new draws."""
    from tqdm import tqdm

    vocabulary = store.vocabulary
    names = list(vocabulary.names)
    cache = cache_dir(out)
    classifier = scanner_classifier(store, extractor, cache)  # checks the scanners and their training slices
    test = [real_features(store, s, "test", extractor, cache)[0] for s in names]
    empty = [name for name, f in zip(names, test, strict=True) if len(f) == 0]
    if empty:
        raise FidError(f"no real slices of {', '.join(f'{name} (test)' for name in empty)} in {store.root}; the "
                       "conditioning check needs train and test slices of every scanner")

    confusion = np.zeros((len(names), len(names)), dtype=int)
    real_correct = 0
    drawn, synthetic, memorised = [], [], []
    for name, feats in tqdm(list(zip(names, test, strict=True)), desc="conditioning", unit="scanner",
                            file=sys.stderr):
        asked = vocabulary.index(name)
        real_correct += int((classifier.predict(feats) == asked).sum())
        if generated is not None:
            features = generated[name]
        else:
            n = len(feats) if n_generated is None else n_generated
            features = extractor(sampler.sample(name, n, seed=seed + SEED_OFFSET, noise=noise))
        np.add.at(confusion[asked], classifier.predict(features), 1)
        drawn.append(len(features))
        synthetic.append(features)
        train = real_features(store, name, "train", extractor, cache)[0]  # cached by scanner_classifier
        memorised.append(memorisation_ratio(features, feats, train))
    record = Conditioning(
        synthetic_trained_accuracy=synthetic_trained_accuracy(synthetic, test, [vocabulary.index(n) for n in names]),
        memorisation_ratio=memorised,
        scanners=names,
        n_train=[store.expected_count("train", name) for name in names],
        n_test=[len(f) for f in test],
        n_generated=drawn,
        generated_seed=seed if generated is not None else seed + SEED_OFFSET,
        noise=noise,
        real_test_accuracy=real_correct / sum(len(f) for f in test),
        generated_accuracy=float(np.trace(confusion) / confusion.sum()),
        confusion=confusion.tolist(),  # rows: scanner asked for, columns: scanner recognised
        classifier=CLASSIFIER,
        extractor=extractor.identity,
        store_sha256=store.sha256,
    )
    out.mkdir(parents=True, exist_ok=True)
    record.write(out / record.file_name)
    return record


def synthetic_trained_accuracy(generated: list[np.ndarray], real_test: list[np.ndarray], ids: list[int]) -> float:
    """Train on synthetic, test on real: the classifier fitted on the generated features alone (set k labelled
    `ids[k]`, the scanner it was asked for), its accuracy on the real test features (set k of scanner `ids[k]`)."""
    labels = np.concatenate([np.full(len(f), i) for f, i in zip(generated, ids, strict=True)])
    classifier = fit_classifier(np.concatenate(generated), labels)
    truth = np.concatenate([np.full(len(f), i) for f, i in zip(real_test, ids, strict=True)])
    return float((classifier.predict(np.concatenate(real_test)) == truth).mean())


def summary(record: Conditioning, out: Path) -> str:
    """One line for the terminal."""
    return (f"conditioning: real test accuracy {record.real_test_accuracy:.3f}, generated recognised as asked "
            f"{record.generated_accuracy:.3f}, trained on synthetic and tested on real "
            f"{record.synthetic_trained_accuracy:.3f} -> {out / record.file_name}")
