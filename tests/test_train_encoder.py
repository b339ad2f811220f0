"""Self-supervised pretraining: augmentations, each method learning, resume, the probe, and encoder.pt in use."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from xsel import hookimpl, plugins
from xsel.encoders import create_encoder, weights_sha256
from xsel.errors import InputError
from xsel.store import read_store
from xsel.train.encoder import (
    EncoderTrainingConfig,
    balance_weights,
    epoch_order,
    load_run_state,
    train_encoder,
)
from xsel.train.pretext import METHODS, SMALL_SCALE, Crop, augment, sinkhorn


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    """48 synthetic radiographs at 48 px: enough structure for a contrastive loss to fall."""
    from xsel.demo import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("toy"), n_images=48, image_size=48, seed=3)


def quick(method: str = "simclr", **changes) -> EncoderTrainingConfig:
    settings = dict(method=method, image_size=32, epochs=2, batch_size=16, queue_size=16, workers=0)
    return EncoderTrainingConfig(**{**settings, **changes})


@pytest.mark.parametrize("crop", [Crop(32), Crop(16, SMALL_SCALE), Crop(40)])
def test_augmentations_keep_shape_and_range_and_follow_the_seed(crop):
    gray = torch.rand(1, 50, 60)
    views = [augment(gray, crop, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    for view in views:
        assert view.shape == (1, crop.size, crop.size) and view.dtype == torch.float32
        assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])


def test_sinkhorn_codes_spread_the_batch_over_the_prototypes():
    generator = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 16, generator=generator) + 2.0, dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    scores = z @ prototypes.T  # cosines, as in SwAV; the shared offset makes a few prototypes win everything
    codes = sinkhorn(scores)
    assert torch.isfinite(codes).all() and torch.allclose(codes.sum(dim=1), torch.ones(64), atol=1e-5)
    balanced = (codes.sum(dim=0) - 8).abs().max()
    greedy = (torch.softmax(scores / 0.05, dim=1).sum(dim=0) - 8).abs().max()
    assert balanced < 0.25 * greedy
    assert torch.isfinite(sinkhorn(torch.randn(64, 8, generator=generator) * 50)).all()


class TinyEncoder:
    """A two-layer CNN encoder plugin: small enough for each method to take many steps in a test."""

    @staticmethod
    @hookimpl
    def register_encoders(register):
        def build(weights=None, image_size=32):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = torch.nn.Sequential(
                    torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
                    torch.nn.BatchNorm2d(16),
                    torch.nn.ReLU(),
                    torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
                    torch.nn.BatchNorm2d(32),
                    torch.nn.ReLU(),
                    torch.nn.AdaptiveAvgPool2d(1),
                    torch.nn.Flatten(),
                )
            model.embedding_dim = 32
            model.preprocessing = {"image_size": image_size, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
            return model

        register("tiny-cnn", build)


@pytest.fixture
def tiny_encoder():
    plugins.register_plugin(TinyEncoder, name="tiny-cnn")
    try:
        yield "tiny-cnn"
    finally:
        plugins.unregister_plugin("tiny-cnn")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_its_loss_on_a_toy_problem(method, toy_csv, tmp_path, tiny_encoder):
    config = quick(method, arch=tiny_encoder, epochs=12, learning_rate=3e-3, projection_dim=32, prototypes=10)
    train_encoder(toy_csv, tmp_path, config, show_progress=False)
    losses = pd.read_csv(tmp_path / "metrics.csv")["loss"].to_numpy()
    assert np.isfinite(losses).all() and len(losses) == 12
    # from epoch 2 on: MoCo's first epoch is easier, its queue still holds random keys
    assert losses[-3:].mean() < losses[1], f"{method}: loss went {losses.round(3)}"


def test_encoder_checkpoint_brings_its_preprocessing_into_embed(toy_csv, tmp_path, cli):
    train_encoder(toy_csv, tmp_path / "run", quick("byol", epochs=1), show_progress=False)
    weights = str(tmp_path / "run" / "encoder.pt")
    result = cli("embed", toy_csv, "--out", tmp_path / "s.h5", "--encoder", "resnet18", "--weights", weights, "-q")
    assert result.exit_code == 0, result.output
    store = read_store(tmp_path / "s.h5")
    assert store.attrs["preprocessing"]["image_size"] == 32
    encoder = create_encoder("resnet18", weights)
    assert (
        store.attrs["weights_sha256"] == weights_sha256(encoder) != weights_sha256(create_encoder("resnet18", "none"))
    )
    from xsel.io.images import load_image
    from xsel.io.table import read_image_table

    first = torch.from_numpy(load_image(read_image_table(toy_csv).files[0], encoder.preprocessing))[None]
    with torch.inference_mode():
        np.testing.assert_allclose(store.embeddings[0], encoder(first)[0].numpy(), atol=1e-4)
    wrong = cli("embed", toy_csv, "--out", tmp_path / "t.h5", "--encoder", "resnet50", "--weights", weights)
    assert wrong.exit_code == 2 and "trained as encoder 'resnet18'" in wrong.output
    exported = cli("export", "--encoder", "resnet18", "--weights", weights, "--out", tmp_path / "bundle")
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["encoder"]["preprocessing"]["image_size"] == 32


def test_resume_after_the_time_budget_continues_exactly(toy_csv, tmp_path):
    config = quick("moco", epochs=2)
    train_encoder(toy_csv, tmp_path / "straight", config, show_progress=False)
    stopped = train_encoder(toy_csv, tmp_path / "resumed", quick("moco", epochs=2, max_minutes=0), show_progress=False)
    assert stopped.stopped_by == "time budget" and stopped.steps == 1
    assert (tmp_path / "resumed" / "encoder.pt").is_file(), "a budget stop still leaves an encoder"
    with pytest.raises(InputError, match="pass --resume"):
        train_encoder(toy_csv, tmp_path / "resumed", config, show_progress=False)
    with pytest.raises(InputError, match="other settings"):
        train_encoder(toy_csv, tmp_path / "resumed", quick("moco", epochs=3), resume=True, show_progress=False)
    fewer = pd.read_csv(toy_csv).head(40).assign(Path=lambda f: [str(toy_csv.parent / p) for p in f["Path"]])
    fewer.to_csv(tmp_path / "fewer.csv", index=False)
    with pytest.raises(InputError, match="another image list"):
        train_encoder(tmp_path / "fewer.csv", tmp_path / "resumed", config, resume=True, show_progress=False)
    finished = train_encoder(toy_csv, tmp_path / "resumed", config, resume=True, show_progress=False)
    assert finished.steps == 6 and finished.stopped_by == "epochs"
    straight = load_run_state(tmp_path / "straight" / "last.pt")["module"]
    resumed = load_run_state(tmp_path / "resumed" / "last.pt")["module"]
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_resume_takes_the_saved_settings_and_refuses_changed_ones(toy_csv, tmp_path, cli, tiny_encoder):
    """nanoGPT-style: `--resume` alone goes on with the run's settings (its time budget too) and folders, and ends
    exactly as an uninterrupted run; an option typed again must match, but --max-minutes and --workers may change."""
    train_encoder(toy_csv, tmp_path / "straight", quick("moco", arch=tiny_encoder), show_progress=False)
    run, csv = tmp_path / "run", tmp_path / "lists" / "images.csv"  # its paths are relative to --image-root
    csv.parent.mkdir()
    csv.write_bytes(toy_csv.read_bytes())
    start = cli(
        "train", "encoder", csv, "--image-root", toy_csv.parent, "--out", run, "--arch", tiny_encoder,
        "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--queue-size", "16", "--workers", "0",
        "--max-minutes", "0", "-q",
    )  # fmt: skip
    assert start.exit_code == 0, start.output
    assert "(1 steps" in start.stdout and "stopped by time budget" in start.stdout
    again = cli("train", "encoder", csv, "--out", run, "--resume", "-q")
    assert again.exit_code == 0, again.output
    assert f"Pretrained {tiny_encoder} with moco" in again.stdout and "(2 steps" in again.stdout
    refused = cli("train", "encoder", csv, "--out", run, "--resume", "--epochs", "3", "-q")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "--epochs 2 → 3" in refused.output and len(refused.output.strip().splitlines()) == 1
    with pytest.raises(InputError, match="--method 'moco' → 'byol'"):
        train_encoder(csv, run, {"method": "byol"}, resume=True, show_progress=False)
    with pytest.raises(InputError, match="unknown encoder training settings epoch;"):
        train_encoder(csv, run, {"epoch": 3}, resume=True, show_progress=False)
    finished = cli("train", "encoder", csv, "--out", run, "--resume", "--max-minutes", "60", "--workers", "0")
    assert finished.exit_code == 0, finished.output
    assert "(6 steps" in finished.stdout and "stopped by epochs" in finished.stdout
    assert train_encoder(csv, run, None, resume=True, show_progress=False).steps == 6  # nothing left to do
    straight = load_run_state(tmp_path / "straight" / "last.pt")
    resumed = load_run_state(run / "last.pt")
    assert all(torch.equal(straight["module"][key], resumed["module"][key]) for key in straight["module"])
    assert resumed["config"] == {**straight["config"], "max_minutes": 60.0}


def test_probe_logs_few_shot_auroc_from_the_untrained_start(demo_store, tmp_path):
    csv = demo_store.parent / "labels.csv"
    config = quick("simclr", epochs=1, probe_conditions=["Cardiomegaly"], probe_episodes=3, probe_k=5)
    result = train_encoder(csv, tmp_path, config, probe_store=demo_store, show_progress=False)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["epoch"].tolist() == [0, 1]
    assert metrics["probe_auroc"].between(0, 1).all() and result.probe_auroc == metrics["probe_auroc"].iloc[-1]
    assert "probe_Cardiomegaly" in metrics.columns


def test_balanced_sampler_draws_each_value_about_equally():
    frame = pd.DataFrame({"Source": ["big"] * 90 + ["small"] * 10})
    weights = balance_weights(frame, "Source")
    order = epoch_order(100, 0, EncoderTrainingConfig(balance_by="Source"), weights)
    share = np.mean([frame["Source"][i] == "small" for i in order * 1])
    assert len(order) == 100 and 0.3 < share < 0.7
    assert epoch_order(100, 1, EncoderTrainingConfig(), None) != epoch_order(100, 2, EncoderTrainingConfig(), None)
    with pytest.raises(InputError, match="no such column"):
        balance_weights(frame, "Site")


def test_undecodable_images_are_skipped_and_listed(toy_csv, tmp_path):
    frame = pd.read_csv(toy_csv)
    frame["Path"] = [str(toy_csv.parent / path) for path in frame["Path"]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    frame = pd.concat([frame, pd.DataFrame({"Path": [str(broken)]})], ignore_index=True)
    frame.to_csv(tmp_path / "with_broken.csv", index=False)
    result = train_encoder(tmp_path / "with_broken.csv", tmp_path / "run", quick(epochs=1), show_progress=False)
    errors = pd.read_csv(tmp_path / "run" / "errors.csv")
    assert result.failed_images == 1 and errors["Path"].tolist() == [str(broken)]
    frame.assign(Path=[str(tmp_path / "missing" / f"{i}.png") for i in range(len(frame))]).to_csv(
        tmp_path / "all_missing.csv", index=False
    )
    with pytest.raises(InputError, match="no image of this epoch could be used"):
        train_encoder(tmp_path / "all_missing.csv", tmp_path / "run2", quick(epochs=1), show_progress=False)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch-size", "500"], "fewer than one batch"),
        (["--arch", "pixels"], "no trainable weights"),
        (["--probe-conditions", "Edema"], "go together"),
        (["--image-size", "16"], "--image-size 16"),
        (["--arch", "vit"], "vit"),
        (["--temperature", "0"], "--temperature 0.0: must be positive"),
        (["--momentum", "1"], "--momentum must lie in [0, 1)"),
        (["--workers", "-1"], "--workers -1: use at least 0"),
    ],
)
def test_bad_settings_are_one_line_input_errors(arguments, message, toy_csv, tmp_path, cli):
    result = cli("train", "encoder", toy_csv, "--out", tmp_path / "run", "-q", "--batch-size", "16", *arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_pretrains_and_reports(toy_csv, tmp_path, cli):
    result = cli(
        "train", "encoder", toy_csv, "--out", tmp_path / "run", "--method", "swav", "--image-size", "32",
        "--epochs", "1", "--batch-size", "16", "--workers", "0", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Pretrained resnet18 with swav" in result.stdout and (tmp_path / "run" / "encoder.pt").is_file()
    record = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)["xsel"]
    assert record["method"] == "swav" and record["preprocessing"]["image_size"] == 32


@pytest.mark.realdata
@pytest.mark.slow
def test_pretraining_on_real_chest_xrays_feeds_the_probe_and_embed(realcxr, tmp_path):
    from xsel.embed import embed

    labels = pd.read_csv(realcxr / "labels.csv")
    nih = labels[labels["Source"].isin(["nih-talo", "nih-zech"])].head(320)
    nih.assign(Path=[str(realcxr / p) for p in nih["Path"]]).to_csv(tmp_path / "nih.csv", index=False)
    embed(tmp_path / "nih.csv", tmp_path / "probe.h5", encoder="pixels", workers=0, show_progress=False)
    config = quick("moco", image_size=64, epochs=2, batch_size=32, queue_size=64)
    config.probe_conditions, config.probe_episodes = ["Infiltration"], 5
    result = train_encoder(tmp_path / "nih.csv", tmp_path / "run", config, probe_store=tmp_path / "probe.h5",
                           show_progress=False)  # fmt: skip
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert result.failed_images == 0 and metrics["epoch"].tolist() == [0, 1, 2]
    assert metrics["probe_auroc"].between(0.3, 1.0).all() and np.isfinite(metrics["loss"].iloc[1:]).all()
    embedded = embed(tmp_path / "nih.csv", tmp_path / "s.h5", encoder="resnet18",
                     weights=str(tmp_path / "run" / "encoder.pt"), show_progress=False)  # fmt: skip
    store = read_store(embedded.store)
    assert store.attrs["preprocessing"]["image_size"] == 64 and np.isfinite(store.embeddings).all()


@pytest.mark.parametrize(("steps", "warmup"), [(10, 0.1), (2, 0.5), (1, 0.3), (50, 0.1)])
def test_one_cycle_runs_every_step_even_with_a_one_step_warm_up(steps, warmup):
    """torch's OneCycle divides by zero when the warm-up ends exactly one step in (160 images, batch 64, 5 epochs)."""
    import torch

    from xsel.train.runtime import one_cycle

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = one_cycle(optimizer, 0.1, steps, warmup)
    rates = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    assert len(rates) == steps and all(np.isfinite(rates))
