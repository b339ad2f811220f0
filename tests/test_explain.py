"""xsel explain: the Grad-CAM map, the target layer per architecture, and the command end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xsel.encoders import create_encoder, weights_sha256
from xsel.errors import InputError
from xsel.train.classifier import ClassifierConfig, train_classifier
from xsel.train.explain import grad_cam, target_layer, upsample
from xsel.train.head import build_head, save_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_grad_cam_highlights_a_planted_bright_square():
    """A toy network whose one feature map is local brightness: the map must peak on the bright square."""
    conv = torch.nn.Conv2d(3, 1, 3, padding=1, bias=False)
    torch.nn.init.constant_(conv.weight, 1 / 27)
    relu = torch.nn.ReLU()
    backbone = torch.nn.Sequential(conv, relu, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    head = build_head(1, 1)
    torch.nn.init.ones_(head.linear.weight)
    image = torch.full((1, 3, 32, 32), 0.1)
    image[:, :, 10:18, 20:28] = 1.0
    cams, probabilities = grad_cam(backbone, head, relu, image, 0)
    heatmap = upsample(cams[0], (64, 64))
    assert heatmap.shape == (64, 64) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    inside = np.zeros((64, 64), dtype=bool)
    inside[20:36, 40:56] = True
    row, column = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert inside[row, column] and heatmap[inside].mean() > 3 * heatmap[~inside].mean()
    assert 0 < probabilities[0] < 1


def test_grad_cam_with_frozen_parameters():
    """A frozen encoder (no parameter requires grad) still gives a map: the gradient flows from the input."""
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    backbone = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    head = build_head(2, 1)
    for parameter in [*backbone.parameters(), *head.parameters()]:
        parameter.requires_grad_(False)
    cams, probabilities = grad_cam(backbone, head, conv, torch.rand(2, 3, 16, 16), 0)
    assert cams.shape == (2, 16, 16) and probabilities.shape == (2,)


def test_grad_cam_layer_outside_the_forward_is_an_input_error():
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    unused = torch.nn.Conv2d(3, 2, 3)
    with pytest.raises(InputError, match="is not called by Sequential's forward"):
        grad_cam(backbone, build_head(2, 1), unused, torch.rand(1, 3, 16, 16), 0)


def test_target_layer_per_architecture():
    resnet = create_encoder("resnet18", "none")
    assert target_layer(resnet) == (resnet.layer4, False)
    densenet = create_encoder("densenet121", "none")
    assert target_layer(densenet) == (densenet.features, True)  # relu after norm5, as DenseNet's forward does
    other = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)), torch.nn.Flatten()
    )
    assert target_layer(other)[0] is other[1]
    with pytest.raises(InputError, match="no convolution layer"):
        target_layer(create_encoder("pixels"))


def _images(folder: Path, n: int, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 90, (size, size + 8)).astype(np.uint8)  # not square: overlays keep the shape
        if i % 2:
            image[10:30, 20:40] = 255
        Image.fromarray(image).save(sub / f"x{i // 2}.png")  # a/x0.png and b/x0.png share a stem
        rows.append({"Path": f"{sub.name}/x{i // 2}.png", "PatientID": f"p{i}", "A": i % 2})
    pd.DataFrame(rows).to_csv(folder / "images.csv", index=False)
    return folder / "images.csv"


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    csv = _images(folder / "data", 12)
    config = ClassifierConfig(labels=["A"], encoder="resnet18", weights="none", image_size=64, epochs=1, batch_size=6)
    train_classifier(csv, folder / "run", config, device="cpu", show_progress=False)
    return csv, folder / "run" / "classifier.pt"


def test_explain_cli_writes_overlays_heatmaps_and_a_contact_sheet(cli, fine_tuned, tmp_path):
    csv, checkpoint = fine_tuned
    frame = pd.read_csv(csv)
    (csv.parent / "broken.png").write_bytes(b"not an image")
    subset = pd.concat([frame.head(4), pd.DataFrame([{"Path": "broken.png", "PatientID": "q", "A": 1}])])
    subset.to_csv(csv.parent / "some.csv", index=False)
    result = cli("explain", checkpoint, csv.parent / "some.csv", "--label", "A", "--out", tmp_path / "cams", "-q")
    assert result.exit_code == 0, result.output
    assert "1 could not be decoded" in result.stdout
    names = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert names == sorted(
        ["x0.png", "x0.npy", "x0-2.png", "x0-2.npy", "x1.png", "x1.npy", "x1-2.png", "x1-2.npy"]
        + ["contact_sheet.png", "explain.csv", "errors.csv"]
    )
    heatmap = np.load(tmp_path / "cams" / "x0.npy")
    assert heatmap.shape == (64, 72) and heatmap.min() >= 0 and heatmap.max() <= 1 and heatmap.max() > 0
    with Image.open(tmp_path / "cams" / "x0.png") as overlay:
        assert overlay.size == (72, 64) and overlay.mode == "RGB"
    assert pd.read_csv(tmp_path / "cams" / "errors.csv")["Path"].tolist() == ["broken.png"]
    table = pd.read_csv(tmp_path / "cams" / "explain.csv")
    assert table["Path"].tolist() == frame["Path"].head(4).tolist() and table["probability"].between(0, 1).all()


def test_explain_linear_probe_needs_the_store_encoder(cli, tmp_path):
    csv = _images(tmp_path / "data", 2)
    encoder = create_encoder("resnet18", "none", image_size=64)
    identity = {
        "encoder": "resnet18",
        "weights_sha256": weights_sha256(encoder),
        "preprocessing": encoder.preprocessing,
    }
    save_classifier(tmp_path / "probe.pt", head=build_head(512, 1), labels=["A"], encoder_identity=identity,
                    thresholds=[0.5], config={})  # fmt: skip
    args = ["explain", tmp_path / "probe.pt", csv, "--label", "A", "--out", tmp_path / "cams", "-q"]
    result = cli(*args)
    assert result.exit_code == 2 and "is a linear probe" in result.stderr
    result = cli(*args, "--weights", "none")  # the store's own encoder: explainable
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cams" / "x0.npy").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label", "Nope"], "--label 'Nope'"),
        (["--label", "A", "--weights", "none"], "leave out --weights"),
        (["--label", "A", "--max-side", "0"], "--max-side 0"),
    ],
)
def test_explain_input_errors(cli, fine_tuned, tmp_path, extra, message):
    csv, checkpoint = fine_tuned
    result = cli("explain", checkpoint, csv, "--out", tmp_path / "cams", "-q", *extra)
    assert result.exit_code == 2 and message in result.stderr, result.output
