"""xsel train classifier: losses, sampler, patient split, pseudo-label thresholds, both training paths, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xsel.errors import InputError
from xsel.labels import split_by_patient
from xsel.store import write_store
from xsel.train.classifier import (
    PSEUDO_RATIO,
    ClassifierConfig,
    EpochChoice,
    augment,
    best_epoch,
    epoch_rows,
    flexmatch_thresholds,
    label_matrix,
    pseudo_targets,
    sample_weights,
    train_classifier,
)
from xsel.train.head import label_weights, load_classifier, multilabel_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"encoder": "resnet18", "weights": "none", "image_size": 32, "batch_size": 8, "learning_rate": 1e-3}


def planted_squares(folder: Path, n: int, *, size: int = 32, seed: int = 0, blank_every: int = 0) -> Path:
    """Dark noise images; label A = a bright square somewhere (every other image), B = every third image.
    With ``blank_every``, every such row has blank labels (unlabeled)."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = rng.integers(0, 90, (size, size)).astype(np.uint8)
        positive = i % 2
        if positive:
            y, x = rng.integers(1, size - size // 3, 2)
            image[y : y + size // 3, x : x + size // 3] = 255
        Image.fromarray(image).save(folder / f"img/{i:03d}.png")
        blank = blank_every and i % blank_every == blank_every - 1
        a, b = (np.nan, np.nan) if blank else (positive, int(i % 3 == 0))
        rows.append({"Path": f"img/{i:03d}.png", "PatientID": f"p{i // 2}", "A": a, "B": b})
    pd.DataFrame(rows).to_csv(folder / "images.csv", index=False)
    return folder / "images.csv"


def synthetic_store(folder: Path, n: int = 400, *, seed: int = 0, b_positive_patients=None) -> tuple[Path, Path]:
    """A store of Gaussian embeddings where A = dim 0 > 0, B = dim 1 > 0.5, and its labelled CSV."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    paths = [f"img/{i:04d}.png" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"encoder": "toy", "weights_sha256": "0" * 64, "preprocessing": {"image_size": 8, "channels": 1}}
    write_store(folder / "toy.h5", embedding_chunks=[x], paths=paths, meta=pd.DataFrame(index=range(n)), attrs=identity)
    frame = pd.DataFrame(
        {"Path": paths, "PatientID": [f"p{i // 3}" for i in range(n)], "A": (x[:, 0] > 0) * 1, "B": (x[:, 1] > 0.5) * 1}
    )
    return folder / "toy.h5", frame


# ---------------------------------------------------------------- pure functions


def test_focal_loss_down_weights_easy_examples():
    ones = torch.ones(1)
    easy, hard = torch.tensor([[4.0]]), torch.tensor([[-1.0]])
    target = torch.tensor([[1.0]])

    def loss(kind, logits):
        return float(multilabel_loss(logits, target, loss=kind, pos_weight=ones, neg_weight=ones))

    # focal / bce = (1 - p_t)^2: ~3e-4 for a confident correct prediction, ~0.53 for a wrong one
    assert loss("focal", easy) / loss("weighted-bce", easy) < 1e-3
    assert loss("focal", hard) / loss("weighted-bce", hard) > 0.5


def test_weighted_bce_balances_classes_by_prevalence():
    targets = np.array([[1.0]] + [[0.0]] * 9)
    pos_weight, neg_weight = label_weights(targets)
    assert pos_weight[0] == pytest.approx(5.0) and neg_weight[0] == pytest.approx(10 / 18)
    logits = torch.zeros(10, 1)  # the same per-entry loss everywhere: the weights decide each class's share
    y = torch.as_tensor(targets, dtype=torch.float32)
    pw, nw = torch.as_tensor(pos_weight), torch.as_tensor(neg_weight)
    total = float(multilabel_loss(logits, y, loss="weighted-bce", pos_weight=pw, neg_weight=nw))
    positives_only = float(multilabel_loss(logits, y, loss="weighted-bce", pos_weight=pw, neg_weight=nw * 0))
    assert positives_only == pytest.approx(total / 2)  # one positive carries half the loss, like nine negatives


def test_balanced_sampler_draws_both_classes_equally():
    targets = np.array([[1.0]] * 10 + [[0.0]] * 90)
    weights = sample_weights(targets)
    drawn = epoch_rows(np.arange(100), np.zeros(0, dtype=np.int64), 20_000, seed=0, epoch=0, weights=weights)
    assert len(drawn) == 20_000 and abs((drawn < 10).mean() - 0.5) < 0.02  # 10% prevalence drawn half the time


def test_epoch_covers_every_labelled_row_and_caps_pseudo_rows():
    """FlexMatch's ratio: 10 labelled rows and 1000 pseudo-labelled ones give an epoch of 10 + μ·10 rows."""
    labelled, pseudo = np.arange(10), np.arange(100, 1100)
    length = 10 + PSEUDO_RATIO * 10
    rows = epoch_rows(labelled, pseudo, length, seed=0, epoch=3)
    assert len(rows) == length and set(labelled) <= set(rows.tolist())
    assert (rows >= 100).sum() == PSEUDO_RATIO * 10 and len(set(rows.tolist())) == length
    assert np.array_equal(rows, epoch_rows(labelled, pseudo, length, seed=0, epoch=3))
    assert not np.array_equal(rows, epoch_rows(labelled, pseudo, length, seed=0, epoch=4))
    few = epoch_rows(labelled, pseudo[:3], length, seed=0, epoch=0)  # fewer pseudo rows: labelled ones fill up
    assert len(few) == length and (few >= 100).sum() == 3 and set(labelled) <= set(few.tolist())


def test_augmentation_depends_on_the_image_seed_only():
    """The same seed gives the same transform whatever the batch around it (so --workers cannot change it)."""
    images = torch.rand(3, 3, 16, 16)
    batch = augment(images, [5, 6, 7])
    assert torch.allclose(batch[1:2], augment(images[1:2], [6]))
    assert not torch.allclose(batch[0], augment(images[0:1], [8])[0])


def test_patient_split_never_shares_a_patient():
    patients = [f"p{i % 37}" for i in range(300)] + [None] * 20
    train, val = split_by_patient(patients, 0.2, seed=3)
    assert len(train) + len(val) == 320 and len(np.intersect1d(train, val)) == 0
    assert not {patients[i] for i in train if patients[i]} & {patients[i] for i in val if patients[i]}
    held_out = {patients[i] or f"row{i}" for i in val}  # an image without PatientID is its own patient
    assert len(held_out) == round(0.2 * (37 + 20))
    again, _ = split_by_patient(patients, 0.2, seed=3)
    other, _ = split_by_patient(patients, 0.2, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(InputError, match="one patient"):
        split_by_patient(["p1"] * 5, 0.2, seed=0)


def test_flexmatch_thresholds_lower_for_hard_classes():
    # label 0: many confident positives, few confident negatives; label 1: nothing confident yet
    p = np.array([[0.99, 0.6]] * 60 + [[0.01, 0.4]] * 5 + [[0.6, 0.5]] * 35)
    thresholds = flexmatch_thresholds(p, 0.95)
    negative, positive = thresholds[0]
    assert positive == pytest.approx(0.95)  # the best-learned class keeps τ
    beta = 5 / 60
    assert negative == pytest.approx(0.75 + 0.2 * beta / (2 - beta))  # FlexMatch's M(β) between floor and τ
    assert np.allclose(thresholds[1], 0.75)  # no confident prediction: the floor
    targets = pseudo_targets(p, thresholds)
    assert (targets[:60, 0] == 1).all() and (targets[60:65, 0] == 0).all() and np.isnan(targets[65:, 0]).all()
    assert np.isnan(targets[:, 1]).all()  # 0.6 / 0.4 stay below the floor


def test_best_epoch_by_mean_auroc_or_last():
    assert best_epoch([0.6, np.nan, 0.8, 0.7]) == 2
    assert best_epoch([np.nan, np.nan, np.nan]) == 2


def test_epoch_choice_is_one_rule_offered_epoch_by_epoch():
    """Both training paths keep an epoch by EpochChoice.offer: True exactly when an epoch becomes the kept one
    (so fine-tuning snapshots only then), the earliest of equal AUROCs, the latest while none is defined."""
    for aurocs, kept_at in [
        ([0.6, np.nan, 0.8, 0.7, 0.8], [0, 2]),
        ([np.nan, np.nan, 0.5, np.nan, 0.4], [0, 1, 2]),
        ([np.nan, np.nan, np.nan], [0, 1, 2]),
    ]:
        choice = EpochChoice()
        offers = [epoch for epoch, value in enumerate(aurocs) if choice.offer(epoch, value)]
        assert offers == kept_at and choice.epoch == kept_at[-1] == best_epoch(aurocs)
        assert choice.val_auroc == aurocs[kept_at[-1]] or np.isnan(aurocs[kept_at[-1]])


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ({}, "no label column 'A'"),
        ({"A": [np.nan, np.nan]}, "column 'A' is empty in every row"),
        ({"A": [1, 2]}, "row 3, column 'A' holds '2'"),
        ({"A": [0, -1]}, None),  # uncertain → positive by default: learnable
        ({"A": [0, 0]}, "label 'A' has no positive image"),
    ],
)
def test_label_matrix_errors_name_the_column(column, message):
    frame = pd.DataFrame({"Path": ["a.png", "b.png"], **column})
    if message is None:
        assert label_matrix(frame, ["A"], uncertain="positive", source="x.csv").tolist() == [[0.0], [1.0]]
    else:
        with pytest.raises(InputError, match=message):
            label_matrix(frame, ["A"], uncertain="positive", source="x.csv")


# ---------------------------------------------------------------- linear probe on a store


def test_store_probe_reports_and_lists_missing_rows(tmp_path):
    store, frame = synthetic_store(tmp_path)
    extra = pd.DataFrame({"Path": ["img/missing.png"], "PatientID": ["zz"], "A": [1], "B": [0]})
    pd.concat([frame, extra]).to_csv(tmp_path / "labels.csv", index=False)
    config = ClassifierConfig(labels=["A", "B"], store=str(store))
    result = train_classifier(tmp_path / "labels.csv", tmp_path / "run", config)
    report = result.report.set_index("label")
    assert report.loc["A", "auroc"] > 0.95 and report.loc["B", "auroc"] > 0.9
    assert (tmp_path / "run" / "roc.png").stat().st_size > 0
    errors = pd.read_csv(tmp_path / "run" / "errors.csv")
    assert errors["Path"].tolist() == ["img/missing.png"] and result.skipped == 1
    classifier = load_classifier(tmp_path / "run")
    assert classifier.backbone_state is None and classifier.encoder_identity["weights_sha256"] == "0" * 64
    assert classifier.thresholds == pytest.approx(report["threshold"].tolist())
    with pytest.raises(InputError, match="already exists"):
        train_classifier(tmp_path / "labels.csv", tmp_path / "run", config)


def test_store_probe_warns_on_a_label_without_validation_positives(tmp_path):
    store, frame = synthetic_store(tmp_path)
    config = ClassifierConfig(labels=["A", "B"], store=str(store))
    _, val = split_by_patient(frame["PatientID"].tolist(), 0.2, seed=0)
    frame.loc[val, "B"] = 0  # B has positives in training only
    frame.to_csv(tmp_path / "labels.csv", index=False)
    result = train_classifier(tmp_path / "labels.csv", tmp_path / "run", config)
    assert any("'B' has no positive image among" in w for w in result.warnings)
    report = result.report.set_index("label")
    assert np.isnan(report.loc["B", "auroc"]) and report.loc["A", "auroc"] > 0.9
    assert result.best_val_auroc == pytest.approx(report.loc["A", "auroc"])  # the mean skips the NaN
    assert (tmp_path / "run" / "classifier.pt").is_file()


def test_store_probe_pseudo_labels_after_warm_up(tmp_path):
    store, frame = synthetic_store(tmp_path, n=600)
    frame.loc[frame.index % 2 == 1, ["A", "B"]] = np.nan  # half the rows unlabeled
    frame.to_csv(tmp_path / "labels.csv", index=False)
    config = ClassifierConfig(labels=["A", "B"], store=str(store), pseudo_labels=True, epochs=3)
    result = train_classifier(tmp_path / "labels.csv", tmp_path / "run", config)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["pseudo_labeled"].tolist()[0] == 0 and metrics["pseudo_labeled"].iloc[1] > 100
    assert (metrics["pseudo_A"].iloc[1:] > 40).all()
    assert result.best_epoch == best_epoch(metrics["val_auroc"].tolist()) + 1
    assert result.best_val_auroc == pytest.approx(metrics["val_auroc"].iloc[result.best_epoch - 1])
    assert result.report.set_index("label").loc["A", "auroc"] > 0.9


def test_store_probe_without_a_defined_auroc_keeps_the_last_epoch(tmp_path):
    """No validation positive of the only label: every epoch's AUROC is NaN and the last refit is kept."""
    store, frame = synthetic_store(tmp_path, n=300)
    _, val = split_by_patient(frame["PatientID"].tolist(), 0.2, seed=0)
    frame.loc[frame.index % 2 == 1, ["A", "B"]] = np.nan
    frame.loc[val, "B"] = 0
    frame.to_csv(tmp_path / "labels.csv", index=False)
    config = ClassifierConfig(labels=["B"], store=str(store), pseudo_labels=True, epochs=3)
    result = train_classifier(tmp_path / "labels.csv", tmp_path / "run", config)
    assert np.isnan(pd.read_csv(tmp_path / "run" / "metrics.csv")["val_auroc"]).all()
    assert result.best_epoch == 3 and np.isnan(result.best_val_auroc)
    assert load_classifier(tmp_path / "run").config["best_epoch"] == 3


def test_store_probe_pseudo_pool_leaves_out_labelled_paths(tmp_path):
    """--unlabeled repeating labelled (training and validation) paths adds only its new rows to the pool."""
    store, frame = synthetic_store(tmp_path, n=600)
    labelled, new = frame.iloc[:300], frame.iloc[300:340]
    labelled.to_csv(tmp_path / "labels.csv", index=False)
    pd.concat([labelled, new])[["Path"]].to_csv(tmp_path / "pool.csv", index=False)
    config = ClassifierConfig(
        labels=["A", "B"], store=str(store), pseudo_labels=True, unlabeled=str(tmp_path / "pool.csv"), epochs=2
    )
    train_classifier(tmp_path / "labels.csv", tmp_path / "run", config)
    pseudo = pd.read_csv(tmp_path / "run" / "metrics.csv")["pseudo_labeled"]
    assert 0 < pseudo.iloc[1] <= len(new)
    labelled[["Path"]].to_csv(tmp_path / "pool.csv", index=False)  # nothing new: nothing to pseudo-label
    with pytest.raises(InputError, match="--pseudo-labels: no unlabelled row"):
        train_classifier(tmp_path / "labels.csv", tmp_path / "run2", config)


def test_store_probe_caps_pseudo_rows_at_the_labelled_count(tmp_path, monkeypatch):
    """20 labelled rows and 580 unlabeled: every refit sees at most 20 + μ·20 rows."""
    import xsel.train.classifier as module

    store, frame = synthetic_store(tmp_path, n=600)
    frame.loc[frame.index >= 60, ["A", "B"]] = np.nan
    frame.to_csv(tmp_path / "labels.csv", index=False)
    sizes = []
    fit = module.fit_linear_head
    monkeypatch.setattr(module, "fit_linear_head", lambda x, y, **kw: sizes.append(len(x)) or fit(x, y, **kw))
    config = ClassifierConfig(labels=["A", "B"], store=str(store), pseudo_labels=True, epochs=3)
    result = train_classifier(tmp_path / "labels.csv", tmp_path / "run", config)
    assert sizes[0] == result.train_images and max(sizes) == (1 + PSEUDO_RATIO) * result.train_images


def test_store_csv_with_a_repeated_path_is_an_input_error(tmp_path):
    store, frame = synthetic_store(tmp_path, n=20)
    pd.concat([frame, frame.iloc[[3]]]).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(InputError, match="row 22, column 'Path' repeats 'img/0003.png' from row 5"):
        train_classifier(tmp_path / "labels.csv", tmp_path / "run", ClassifierConfig(labels=["A"], store=str(store)))


def test_store_without_any_csv_row_is_an_input_error(tmp_path):
    store, _ = synthetic_store(tmp_path, n=20)
    pd.DataFrame({"Path": ["other.png", "x.png"], "A": [1, 0]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(InputError, match="none of its 2 Path values"):
        train_classifier(tmp_path / "labels.csv", tmp_path / "run", ClassifierConfig(labels=["A"], store=str(store)))


# ---------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A resnet18 fine-tuned for 2 epochs on 28 tiny images (4 unlabeled, 1 undecodable), pseudo-labels on."""
    folder = tmp_path_factory.mktemp("tuned")
    csv = planted_squares(folder / "data", 28, blank_every=7)
    frame = pd.read_csv(csv)
    (folder / "data" / "img" / "broken.png").write_bytes(b"not a png")
    broken = {"Path": "img/broken.png", "PatientID": "px", "A": 1, "B": 0}
    pd.concat([frame, pd.DataFrame([broken])]).to_csv(csv, index=False)
    config = ClassifierConfig(labels=["A", "B"], epochs=2, pseudo_labels=True, **TINY)
    result = train_classifier(csv, folder / "run", config, device="cpu", show_progress=False)
    return csv, folder, result


def test_fine_tune_writes_a_run_and_skips_broken_images(tuned):
    csv, folder, result = tuned
    run = folder / "run"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2] and metrics["pseudo_labeled"].iloc[0] == 0
    assert result.best_epoch == best_epoch(metrics["val_auroc"].tolist()) + 1
    errors = pd.read_csv(run / "errors.csv")
    assert errors["Path"].tolist() == ["img/broken.png"] and result.skipped == 1
    report = pd.read_csv(run / "report.csv")
    assert report["label"].tolist() == ["A", "B"] and set(report.columns) >= {"auroc", "ap", "f1", "kappa"}
    classifier = load_classifier(run / "classifier.pt")
    assert classifier.config["best_epoch"] == result.best_epoch and classifier.config["pseudo_labels"] is True
    assert float(classifier.head.input_mean.abs().sum()) == 0 and float(classifier.head.input_scale.min()) == 1


def test_fine_tuning_does_not_depend_on_decode_workers(tmp_path):
    """Sampling and augmentation are seeded per epoch and row, not by the order workers deliver batches."""
    csv = planted_squares(tmp_path / "data", 16)
    heads = []
    for workers in (0, 1):
        config = ClassifierConfig(labels=["A"], epochs=1, balanced_sampler=True, workers=workers, **TINY)
        train_classifier(csv, tmp_path / f"run{workers}", config, device="cpu", show_progress=False)
        heads.append(load_classifier(tmp_path / f"run{workers}").head.linear.weight.detach())
    assert torch.equal(*heads)


def test_fine_tuned_classifier_round_trips_through_embed(tuned, tmp_path):
    """`xsel embed --weights classifier.pt` gives the same encoder identity, and the head on those embeddings
    reproduces the fine-tuned network's predictions."""
    from xsel.embed import embed
    from xsel.encoders import create_encoder
    from xsel.io.images import load_image
    from xsel.store import read_store

    csv, folder, _ = tuned
    checkpoint = folder / "run" / "classifier.pt"
    classifier = load_classifier(checkpoint)
    embed(csv, tmp_path / "tuned.h5", encoder="resnet18", weights=str(checkpoint), image_size=32, workers=0,
          show_progress=False)  # fmt: skip
    store = read_store(tmp_path / "tuned.h5")
    assert store.encoder_identity == classifier.encoder_identity
    backbone = create_encoder("resnet18", "none", image_size=32)
    backbone.load_state_dict(classifier.backbone_state)
    images = torch.from_numpy(np.stack([load_image(csv.parent / p, backbone.preprocessing) for p in store.paths[:6]]))
    with torch.inference_mode():
        direct = torch.sigmoid(classifier.head(backbone(images)).double()).numpy()
    assert np.allclose(classifier.probabilities(store.embeddings[:6]), direct, atol=1e-5)


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "extra",
    [["--encoder", "resnet18"], ["--weights", "none"], ["--image-size", "64"], ["--batch-size", "4"],
     ["--no-augment"], ["--workers", "2"], ["--device", "cpu"], ["--image-root", "."], ["--balanced-sampler"]],
)  # fmt: skip
def test_cli_train_classifier_store_refuses_fine_tuning_options(cli, tmp_path, extra):
    store, frame = synthetic_store(tmp_path, n=40)
    frame.to_csv(tmp_path / "labels.csv", index=False)
    result = cli("train", "classifier", tmp_path / "labels.csv", "--labels", "A", "--store", store,
                 "--out", tmp_path / "run", "-q", *extra)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{extra[0]} applies to fine-tuning" in result.stderr and "Traceback" not in result.output


def test_cli_train_classifier_store_path(cli, tmp_path):
    store, frame = synthetic_store(tmp_path)
    frame.to_csv(tmp_path / "labels.csv", index=False)
    result = cli("train", "classifier", tmp_path / "labels.csv", "--labels", "A,B", "--store", store,
                 "--out", tmp_path / "run", "--loss", "focal", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no PatientID in both" in result.stderr and "A: AUROC" in result.stdout
    assert (tmp_path / "run" / "classifier.pt").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "A,Missing"], "no label column 'Missing'"),
        (["--labels", "A", "--weights", "{bad}"], "does not fit ResNet"),
        (["--labels", "A", "--val-fraction", "1.5"], "--val-fraction 1.5"),
        (["--labels", "A", "--unlabeled", "{csv}"], "--unlabeled feeds --pseudo-labels"),
        (["--labels", "A", "--pseudo-labels"], "--pseudo-labels: no unlabelled row"),
    ],
)
def test_cli_train_classifier_input_errors(cli, tmp_path, extra, message):
    csv = planted_squares(tmp_path / "data", 8)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    extra = [e.format(bad=tmp_path / "bad.pt", csv=csv) for e in extra]
    result = cli("train", "classifier", csv, "--out", tmp_path / "run", "--encoder", "resnet18", "--image-size",
                 "32", "--epochs", "1", "-q", *extra)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
