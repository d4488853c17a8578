"""`mrgen-fid diagnose`: where a trained run keeps the scanner, and what its decoder can reach at best.

    mrgen-fid diagnose --store STORE --run RUN --out results/fid/ [--device auto|cuda|cpu] [--inception-weights W]
                       [--noise] [--swaps]

Needs torch and the trained run folder (model.safetensors + config.json, rebuilt by its family through
`mrgen_dist.export.load_trained`, so the 'train' extra), and the store it was trained on: a run whose
store_sha256 or scanners differ from the store's is refused. Two probes, written to OUT/diagnostics.json:

* **z probe**: the posterior means of the real train slices (`Family.encode_mean`, mapped into the z space the
  sampling graph takes, where the prior is N(0, I)) train a scanner classifier (the conditioning check's
  standardised logistic regression, `conditioning.fit_classifier`), scored on the posterior means of the real
  test slices. Near chance (1 / number of scanners): z holds no scanner, so a prior draw with a label loses
  nothing. Well above chance: the encoder writes the scanner into z and the decoder may take the scanner's
  look from z instead of from the label; z ~ N(0, I) at sampling time then carries a random one.
* **reconstruction**: the posterior means of the real test slices decoded with their own labels (the sampling
  graph's mean image; with `--noise`, a draw of the model's learned noise around it, as `mrgen-fid --noise`
  draws samples), recognised by the conditioning check's classifier (`conditioning.scanner_classifier`,
  Inception features of the real train slices, cached in OUT/cache/ like the other real features). The rate
  at which they are recognised as their scanner is the decoder's ceiling: generated slices are not expected to
  be recognised better than reconstructions of real ones. `real_test_accuracy` is the same classifier on the
  real test slices themselves.

  Beside it, per scanner, their precision and recall against the real train slices (Inception, k = 5): with
  the real anatomy given, how close the model's slices come to real ones. Far above the generated slices'
  own, they say that the anatomy the model draws is what its samples lack.
* **swaps** (`--swaps`): the real test slices with one region (background, rim, interior) or band (coarse,
  fine) replaced by their reconstructions', recognised by the same classifier (eval/swaps.py): which part of the
  reconstructions makes the classifier read another scanner.

A refiner (models/refiner.py) has no encoder; its reconstructions are the real test slices' own low-pass in the
coarse slice's place, refined with their labels (`Family.refine_real`): the refiner's ceiling, what it makes of
a perfect coarse generator (no z probe). Any other family without an encoder (`encode_mean` returns None) gets
null for all three, and `reason` says why.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mrgen_dist import __version__
from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.conditioning import CLASSIFIER, confusion, fit_classifier, scanner_classifier
from mrgen_dist.eval.features import FidError, cache_dir, real_features
from mrgen_dist.eval.quality import PRDC_K, prdc
from mrgen_dist.eval.results import DECODED_SOURCE, REFINED_SOURCE, Diagnostics, Reconstruction, ZProbe
from mrgen_dist.eval.swaps import swap_probe, swap_table
from mrgen_dist.runtime.noise import NoiseTexture, add_noise

#: Images per encoder / decoder call.
BATCH = 256
Z_CLASSIFIER = ("multinomial logistic regression (as the conditioning check's) on standardised posterior means "
                "of real train slices")


def torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FidError("--device cuda: this torch sees no CUDA GPU (a CPU build, or no GPU visible)")
    return torch.device(device)


def encode_means(family, model, images: np.ndarray, scanner: np.ndarray, level: np.ndarray, device: torch.device,
                 desc: str) -> np.ndarray | None:
    """Posterior means (n, latent) in the sampling z space, float32, of slices at axial `level`; None for a
    family without an encoder."""
    from tqdm import tqdm

    out = []
    for start in tqdm(range(0, len(images), BATCH), desc=desc, unit="batch", file=sys.stderr):
        x = torch.as_tensor(images[start : start + BATCH]).to(device).float()
        s, k = (torch.as_tensor(a[start : start + BATCH], dtype=torch.int64).to(device) for a in (scanner, level))
        with torch.no_grad():
            z = family.encode_mean(model, x, s, k)
        if z is None:
            return None
        out.append(z.float().cpu().numpy())
    return np.concatenate(out)


def decode_means(family, model, z: np.ndarray, scanner: np.ndarray, device: torch.device, noise: bool = False,
                 level: np.ndarray | None = None) -> np.ndarray:
    """`family.export_graph(model)(z, scanner)` (and `level`, for a level-conditioned graph): the mean images
    (n, H, W), float32, in batches; with `noise`, a draw of the graph's learned observation noise around them
    (`sample.add_noise`, of the graph's `noise_kind`) from streams seeded 0."""
    graph = family.export_graph(model).eval()
    if noise and not graph.has_noise:
        raise FidError(f"--noise: the {family.title or family.name} run has no learned observation noise; diagnose "
                       "its mean images without --noise")
    rngs = [np.random.default_rng([0, part]) for part in (1, 2, 3)]
    texture = NoiseTexture(**graph.noise_texture()) if noise and graph.noise_kind == ModelMetadata.CHI_NOISE else None
    out = []
    for start in range(0, len(z), BATCH):
        labels = torch.as_tensor(scanner[start : start + BATCH], dtype=torch.int64).to(device)
        levels = (torch.as_tensor(level[start : start + BATCH], dtype=torch.int64).to(device),) \
            if graph.level_condition else ()
        with torch.no_grad():
            images = graph(torch.as_tensor(z[start : start + BATCH]).to(device), labels, *levels).float().cpu().numpy()
            if noise:
                images = add_noise(images, graph.noise_sigma(labels).float().cpu().numpy(), graph.noise_kind, rngs,
                                   labels.cpu().numpy(), texture)
        out.append(images[:, 0])
    return np.concatenate(out)


def diagnose(store: SliceStore, run: str | Path, out: Path, inception_weights: str | Path | None = None,
             device: str = "auto", noise: bool = False, swaps: bool = False) -> Diagnostics:
    """The z probe and the reconstruction check of a trained run on its store, and with `swaps` the
    component-swap probe (eval/swaps.py); writes and returns OUT/diagnostics.json."""
    from mrgen_dist.eval.inception import load_inception
    from mrgen_dist.runs import load_trained, store_mismatch

    run = Path(run)
    family, model, record = load_trained(run)
    mismatch = store_mismatch(store, record)
    if mismatch:
        raise FidError(f"the run {run} was {mismatch}; diagnose a run with the store it was trained on")
    names = list(store.vocabulary.names)
    missing = [f"{name} ({side})" for side in ("train", "test") for name in names
               if store.expected_count(side, name) == 0]
    if missing:
        raise FidError(f"no real slices of {', '.join(missing)} in {store.root}; the diagnostics need train and test "
                       "slices of every scanner")
    dev = torch_device(device)
    model = model.to(dev).eval()
    test = store.load_split("test")
    z_test = encode_means(family, model, test.images, test.scanner, test.slice_index, dev, "encode test")
    z_probe = reconstruction = extractor = reason = swap_rows = recon = None
    if z_test is None:
        recon = family.refine_real(model, test.images, test.scanner)
        source = REFINED_SOURCE
        if recon is None:
            reason = (f"family {family.name} has no encoder (encode_mean returns None) and refines no generator's "
                      "slices: no posterior means to probe or to reconstruct from")
    else:
        train = store.load_split("train")
        z_train = encode_means(family, model, train.images, train.scanner, train.slice_index, dev, "encode train")
        y_train = np.asarray(train.scanner)
        del train  # the largest array here
        probe = fit_classifier(z_train, y_train)
        z_confusion = confusion(np.asarray(test.scanner), probe.predict(z_test), len(names))
        z_probe = ZProbe(
            accuracy=float(np.trace(z_confusion) / z_confusion.sum()),
            chance=1.0 / len(names),
            confusion=z_confusion.tolist(),  # rows: true scanner, columns: predicted from z
            n_train=np.bincount(y_train, minlength=len(names)).tolist(),
            n_test=np.bincount(np.asarray(test.scanner), minlength=len(names)).tolist(),
            latent=int(z_train.shape[1]),
            classifier=Z_CLASSIFIER,
        )
        recon = decode_means(family, model, z_test, np.asarray(test.scanner), dev, noise, test.slice_index)
        source = DECODED_SOURCE
    if recon is not None:
        extractor = load_inception(inception_weights, None if device == "auto" else device)
        cache = cache_dir(out)
        classifier = scanner_classifier(store, extractor, cache)
        labels = np.asarray(test.scanner)
        features = extractor(recon)
        r_confusion = confusion(labels, classifier.predict(features), len(names))
        real_correct = sum(int((classifier.predict(real_features(store, name, "test", extractor, cache)[0]) == k).sum())
                           for k, name in enumerate(names))
        quality = reconstruction_quality(store, names, features, labels, extractor, cache)
        reconstruction = Reconstruction(
            accuracy=float(np.trace(r_confusion) / r_confusion.sum()),
            confusion=r_confusion.tolist(),  # rows: true scanner (decoded with its label), columns: recognised
            real_test_accuracy=real_correct / len(test.scanner),
            n_test=int(len(test.scanner)),
            noise=noise,  # whether the reconstructions drew the model's learned noise (--noise)
            classifier=CLASSIFIER,
            source=source,
            precision=None if quality is None else [q["precision"] for q in quality],
            recall=None if quality is None else [q["recall"] for q in quality],
        )
        if swaps:
            real = np.asarray(test.images, dtype=np.float32)
            swap_rows = swap_probe(real, recon, labels, lambda images: classifier.predict(extractor(images)),
                                   len(names))
    result = Diagnostics(
        scanners=names,
        store_sha256=store.sha256,
        run=str(run),
        family=family.name,
        title=family.title or family.name,
        parameters=sum(p.numel() for p in model.parameters()),
        training=record.training,
        encoder=z_test is not None,
        z_probe=z_probe,
        reconstruction=reconstruction,
        swaps=swap_rows,
        reason=reason,
        extractor=extractor.identity if extractor is not None else None,
        device=str(dev),
        package_version=__version__,
    )
    out.mkdir(parents=True, exist_ok=True)
    result.write(out / result.file_name)
    return result


def reconstruction_quality(store: SliceStore, names: list[str], features: np.ndarray, labels: np.ndarray,
                           extractor, cache: Path) -> list[dict[str, float]] | None:
    """Per scanner, `prdc` of the reconstructions' Inception `features` (their scanner `labels`) against the real
    train slices' (cached); None where a scanner has too few slices on either side for k = 5 neighbours."""
    real = [real_features(store, name, "train", extractor, cache)[0] for name in names]
    if min(min(len(f), int((labels == k).sum())) for k, f in enumerate(real)) < PRDC_K + 2:
        return None
    return [prdc(f, features[labels == k], k=PRDC_K) for k, f in enumerate(real)]


def summary(result: Diagnostics, out: Path) -> str:
    """One line for the terminal (and the component-swap table)."""
    head = f"diagnostics ({result.title}, {result.parameters:,} parameters)"
    rec = result.reconstruction
    if rec is None:
        return f"{head}: {result.reason} -> {out / result.file_name}"
    z = result.z_probe
    line = head + ": " + ("" if z is None else f"scanner read from z with accuracy {z.accuracy:.3f} (chance "
                                                f"{z.chance:.3f}); ")
    what = "refinements of the real test slices' low-pass" if rec.refined else "reconstructions"
    line += (f"{what} recognised as their scanner {rec.accuracy:.3f} (real test slices "
             f"{rec.real_test_accuracy:.3f})")
    if rec.precision is not None:
        line += (", precision " + ", ".join(f"{p:.2f}" for p in rec.precision) + " and recall "
                 + ", ".join(f"{r:.2f}" for r in rec.recall) + " per scanner against the real train slices")
    line += f" -> {out / result.file_name}"
    if result.swaps:
        line += ("\nreal test slices recognised as their scanner with one component from the reconstructions:\n"
                 + swap_table(result.swaps, result.scanners))
    return line
