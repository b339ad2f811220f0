"""The field's encoders: torchxrayvision, timm (CNNs and ViTs) and RAD-DINO, plus the two core pieces they need —
name families in the plugin registry (``timm:<model>``) and the optional preprocessing keys (crop, crop_pct,
interpolation). Every model is built with random weights (no download); each library's tests skip when it or its
plugin distribution is not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xsel import hookimpl, plugins
from xsel.errors import InputError, XselError
from xsel.io.images import load_image, preprocess

SMALL = 64  # input size that keeps forward passes fast


def needs(library: str, encoder: str):
    """Skip unless ``library`` imports and the plugin that registers ``encoder`` is installed."""
    module = pytest.importorskip(library)
    try:
        plugins.get("encoder", encoder)
    except InputError:
        pytest.skip(f"the xsel plugin providing {encoder} is not installed")
    return module


def write_images(folder, sizes=((90, 70), (70, 90), (64, 64))) -> list:
    """Gray PNGs of the given (width, height), non-square so that the centre crop matters."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height) in enumerate(sizes):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# --- the registry: name families ------------------------------------------------------------------------------


class FamilyPlugin:
    @staticmethod
    @hookimpl
    def register_encoders(register):
        register("toy:", lambda model, weights=None: (model, weights), prefix=True, metavar="thing", weights=("w1",))
        register("toy:long-", lambda model, weights=None: ("long", model), prefix=True)
        register("toy:exact", lambda weights=None: "exact", weights=("a", "b"))


@pytest.fixture
def family():
    plugins.register_plugin(FamilyPlugin, name="family")
    try:
        yield
    finally:
        plugins.unregister_plugin("family")


def test_a_family_member_resolves_with_its_name_bound(family):
    entry = plugins.get("encoder", "toy:abc")
    assert entry.name == "toy:abc" and entry.prefix == "toy:"  # the full name is the encoder identity
    assert entry.factory(weights="w1") == ("abc", "w1")
    assert plugins.get("encoder", "toy:exact").factory() == "exact"  # an exact name wins over the family
    assert plugins.get("encoder", "toy:long-x").factory() == ("long", "x")  # the longest prefix wins
    assert "toy:<thing>" not in plugins.names("encoder")  # names() stays the buildable fixed names


def test_unknown_names_list_the_families(family):
    with pytest.raises(InputError, match=r"unknown encoder 'toy:'; choose one of: .*toy:<thing>"):
        plugins.get("encoder", "toy:")  # the bare prefix names no member


def test_plugins_lists_families_and_weight_sets(family, cli):
    rows = {row["name"]: row for row in json.loads(cli("plugins", "--json").stdout)}
    assert (rows["toy:<thing>"]["prefix"], rows["toy:<thing>"]["weights"]) == ("toy:", ["w1"])
    assert (rows["toy:exact"]["prefix"], rows["toy:exact"]["weights"]) == (None, ["a", "b"])
    table = cli("plugins")
    assert table.exit_code == 0 and "toy:<thing>" in table.stdout


@pytest.mark.parametrize(
    ("registration", "message"),
    [
        (lambda register: [register("dup:", object, prefix=True), register("dup:", object, prefix=True)], "both"),
        (lambda register: register("fam:", object, prefix=True, aliases=("f:",)), "takes no aliases"),
    ],
)
def test_bad_family_registrations_are_refused(registration, message):
    class Bad:
        @staticmethod
        @hookimpl
        def register_encoders(register):
            registration(register)

    plugins.register_plugin(Bad, name="bad")
    try:
        with pytest.raises(XselError, match=message):
            plugins.registry("encoder")
    finally:
        plugins.unregister_plugin("bad")


# --- preprocessing: the optional keys --------------------------------------------------------------------------

BASE = {"image_size": 20, "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_without_optional_keys_preprocessing_is_the_plain_bilinear_resize():
    gray = np.random.default_rng(1).random((53, 41)).astype(np.float32)
    resized = np.asarray(Image.fromarray(gray).resize((20, 20), Image.Resampling.BILINEAR), dtype=np.float32)
    mean, std = (np.asarray(BASE[k], np.float32).reshape(-1, 1, 1) for k in ("mean", "std"))
    expected = (np.broadcast_to(resized, (3, 20, 20)) - mean) / std
    assert preprocess(gray, BASE).tobytes() == np.ascontiguousarray(expected, np.float32).tobytes()


@pytest.mark.parametrize("shape", [(52, 37), (37, 52), (40, 40), (41, 38)])
def test_center_crop_cuts_torchxrayvisions_square(shape):
    gray = np.random.default_rng(2).random(shape).astype(np.float32)
    side = min(shape)
    top, left = shape[0] // 2 - side // 2, shape[1] // 2 - side // 2  # xrv.datasets.XRayCenterCrop
    pre = {"image_size": side, "channels": 1, "mean": [0.0], "std": [1.0], "crop": "center"}
    assert np.array_equal(preprocess(gray, pre)[0], gray[top : top + side, left : left + side])


def test_crop_pct_resamples_the_central_fraction():
    gray = np.random.default_rng(3).random((40, 40)).astype(np.float32)
    pre = {"image_size": 20, "channels": 1, "mean": [0.0], "std": [1.0], "crop_pct": 0.5, "interpolation": "nearest"}
    assert np.array_equal(preprocess(gray, pre)[0], gray[10:30, 10:30])


def test_interpolation_is_applied_and_bad_values_are_refused():
    gray = np.random.default_rng(4).random((50, 50)).astype(np.float32)
    assert not np.array_equal(preprocess(gray, BASE), preprocess(gray, {**BASE, "interpolation": "bicubic"}))
    for bad in ({"interpolation": "area"}, {"crop": "top"}, {"crop_pct": 1.5}):
        with pytest.raises(ValueError, match="preprocessing"):
            preprocess(gray, {**BASE, **bad})


# --- torchxrayvision ------------------------------------------------------------------------------------------

XRV = {"xrv-densenet121": (1024, 224), "xrv-resnet50": (2048, 512), "xrv-autoencoder": (512, 224)}


@pytest.mark.parametrize("name", XRV)
def test_xrv_encoders_meet_the_contract(name):
    from xsel.encoders import create_encoder, weights_sha256
    from xsel.testing import check_encoder

    needs("torchxrayvision", name)
    native, small = create_encoder(name, "none"), create_encoder(name, "none", image_size=SMALL)
    dim, size = XRV[name]
    assert native.embedding_dim == dim
    expected = {"image_size": size, "channels": 1, "mean": [0.5], "std": [1 / 2048], "crop": "center"}
    assert native.preprocessing == expected
    check_encoder(small)
    assert weights_sha256(small) == weights_sha256(native)  # the same seeded init in every build, at any size


def test_xrv_pixels_are_torchxrayvisions(tmp_path):
    xrv = needs("torchxrayvision", "xrv-densenet121")
    from xsel.encoders import create_encoder

    path = write_images(tmp_path, [(90, 70)])[0]
    pre = {**create_encoder("xrv-densenet121", "none").preprocessing, "image_size": 70}  # crop only, no resize
    theirs = xrv.datasets.XRayCenterCrop()(xrv.utils.normalize(np.asarray(Image.open(path)), 255)[None])
    ours = load_image(path, pre)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-3  # [-1024, 1024]: float32 rounding


def test_xrv_embeddings_are_torchxrayvisions_features():
    import torch

    xrv = needs("torchxrayvision", "xrv-densenet121")
    from xsel.encoders import create_encoder

    x = torch.randn(2, 1, SMALL, SMALL, generator=torch.Generator().manual_seed(0)) * 500
    with torch.inference_mode():
        torch.manual_seed(0)
        densenet = xrv.models.DenseNet(weights=None).eval()
        torch.manual_seed(0)
        autoencoder = xrv.autoencoders.ResNetAE(weights=None).eval()
        assert torch.allclose(create_encoder("xrv-densenet121", "none")(x), densenet.features2(x), atol=1e-5)
        reference = autoencoder.encode(x).mean(dim=(2, 3))
        assert torch.allclose(create_encoder("xrv-autoencoder", "none")(x), reference, atol=1e-5)


DENSENET_RELEASE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


class RunsCode:
    """Unpickling this creates the folder ``marker``: what a weights file from an untrusted source could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_xrv_local_files_load_without_torchxrayvisions_unpickling(tmp_path):
    """A DenseNet pickled whole by current torch and the ResNet-50 release (a state dict) load by path; a DenseNet
    release file (a whole model in torch's pre-1.6 format) is refused with the conversion to run where it is trusted."""
    import torch
    import torchvision

    xrv = needs("torchxrayvision", "xrv-densenet121")
    from xsel.encoders import create_encoder

    torch.manual_seed(5)
    trained = xrv.models.DenseNet(weights=None, num_classes=18)
    torch.save(trained, tmp_path / "pickled.pt")
    encoder = create_encoder("xrv-densenet121", str(tmp_path / "pickled.pt"))
    assert torch.equal(encoder.features.conv0.weight, trained.features.conv0.weight)
    assert torch.equal(encoder.features.norm5.running_var, trained.features.norm5.running_var)
    torch.save(trained, tmp_path / DENSENET_RELEASE, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"pickled by torch < 1.6.*python -c .*state_dict\(\)") as refused:
        create_encoder("xrv-densenet121", str(tmp_path / DENSENET_RELEASE))
    assert "\n" not in str(refused.value)

    resnet50 = torchvision.models.resnet50(num_classes=18)  # the ResNet-50 release: its state dict, one channel
    resnet50.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    release = "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt"
    torch.save(resnet50.state_dict(), tmp_path / release)
    resnet = create_encoder("xrv-resnet50", str(tmp_path / release))
    reference = xrv.models.ResNet(weights="resnet50-res512-all", cache_dir=str(tmp_path)).eval()  # the test's file
    x = torch.randn(1, 1, 512, 512, generator=torch.Generator().manual_seed(1)) * 500
    with torch.inference_mode():
        assert torch.allclose(resnet(x), reference.features(x), atol=1e-4)


@pytest.mark.parametrize("old_format", [False, True])
def test_xrv_a_weights_file_that_would_run_code_is_refused_and_never_runs(tmp_path, old_format):
    import torch

    xrv = needs("torchxrayvision", "xrv-densenet121")
    from xsel.encoders import create_encoder

    def booby_trapped(marker):
        model = xrv.models.DenseNet(weights=None)
        model.payload = RunsCode(marker)  # rides along in the pickled model's attributes
        path = tmp_path / f"from-{marker.name}" / DENSENET_RELEASE  # named like the release file
        path.parent.mkdir()
        torch.save(model, path, _use_new_zipfile_serialization=not old_format)
        return path

    marker = tmp_path / "ran"
    with pytest.raises(InputError, match="without running code from it"):
        create_encoder("xrv-densenet121", str(booby_trapped(marker)))
    assert not marker.exists()
    live = tmp_path / "ran-when-trusted"  # the same file, unpickled the way torchxrayvision does it, runs the code
    torch.load(booby_trapped(live), weights_only=False)
    assert live.is_dir()


def test_xrv_named_set_is_fetched_by_torchxrayvision_once_and_kept_as_a_state_dict(tmp_path, monkeypatch):
    """``--weights all``: torchxrayvision downloads its release file into a fresh folder and loads it; xsel keeps
    the state dict and reads only that afterwards. A file already lying in the cache under the release name is not
    the download, so it is never read."""
    import requests
    import torch

    xrv = needs("torchxrayvision", "xrv-densenet121")
    from xsel_torchxrayvision.encoders import named_weights_file

    from xsel.encoders import create_encoder

    torch.manual_seed(8)
    released = xrv.models.DenseNet(weights=None, num_classes=18)
    downloads = []

    def download(url, filename):
        downloads.append(Path(filename))
        torch.save(released, filename, _use_new_zipfile_serialization=False)  # the release format

    monkeypatch.setenv("HOME", str(tmp_path))  # torchxrayvision's cache folder lives in ~
    monkeypatch.setattr(xrv.utils, "download", download)
    cache = Path(xrv.utils.get_cache_dir())
    cache.mkdir(parents=True)
    marker = tmp_path / "ran"
    planted = xrv.models.DenseNet(weights=None)
    planted.payload = RunsCode(marker)
    torch.save(planted, cache / DENSENET_RELEASE)  # copied into the cache by hand: not torchxrayvision's download

    encoder = create_encoder("xrv-densenet121", "all")
    assert torch.equal(encoder.features.conv0.weight, released.features.conv0.weight)
    assert not marker.exists() and len(downloads) == 1 and downloads[0].parent != cache
    kept = named_weights_file(xrv, "densenet121-res224-all")
    assert sorted(path.name for path in cache.iterdir()) == sorted([DENSENET_RELEASE, kept.name])  # download gone
    assert all(isinstance(v, torch.Tensor) for v in torch.load(kept, weights_only=True).values())

    def offline(url, filename):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(xrv.utils, "download", offline)
    again = create_encoder("xrv-densenet121", "all")  # from the kept state dict, without a download
    assert torch.equal(again.features.norm5.weight, released.features.norm5.weight)
    assert torch.equal(create_encoder("xrv-densenet121", str(kept)).features.norm5.bias, released.features.norm5.bias)


def test_xrv_state_dict_of_the_torchxrayvision_model_loads(tmp_path):
    import torch

    xrv = needs("torchxrayvision", "xrv-densenet121")
    from xsel.encoders import create_encoder

    torch.manual_seed(6)
    trained = xrv.models.DenseNet(weights=None)
    trained.op_threshs = torch.rand(18)  # what named weights carry; a fine-tuned model's state dict has it too
    torch.save(trained.state_dict(), tmp_path / "finetuned.pt")
    encoder = create_encoder("xrv-densenet121", str(tmp_path / "finetuned.pt"))
    assert torch.equal(encoder.features.norm5.weight, trained.features.norm5.weight)
    with pytest.raises(InputError, match="does not fit"):
        torch.save({"features.conv0.weight": torch.zeros(1)}, tmp_path / "other.pt")
        create_encoder("xrv-densenet121", str(tmp_path / "other.pt"))


def test_xrv_weight_names_and_failed_downloads(tmp_path, monkeypatch):
    import requests

    xrv = needs("torchxrayvision", "xrv-densenet121")
    from xsel_torchxrayvision.encoders import resolve_weights

    from xsel.encoders import create_encoder

    assert resolve_weights("xrv-densenet121", "chex") == resolve_weights("xrv-densenet121", "chexpert")
    assert resolve_weights("xrv-densenet121", "densenet121-res224-pc") == "densenet121-res224-pc"
    with pytest.raises(InputError, match="neither a weight set of xrv-densenet121 .*nih"):
        create_encoder("xrv-densenet121", "imagenet")

    def offline(url, filename):
        raise requests.ConnectionError("no network")

    monkeypatch.setenv("HOME", str(tmp_path))  # torchxrayvision's cache folder lives in ~
    monkeypatch.setattr(xrv.utils, "download", offline)
    with pytest.raises(InputError, match=r"cannot download torchxrayvision's densenet121-res224-nih .*--weights PATH/"):
        create_encoder("xrv-densenet121", "nih")


# --- timm -----------------------------------------------------------------------------------------------------

TIMM = {"timm:resnet10t": 512, "timm:vit_tiny_patch16_224": 192, "timm:convnext_atto": 320}


@pytest.mark.parametrize("name", TIMM)
def test_timm_encoders_meet_the_contract(name, one_torch_thread):
    timm = needs("timm", name)
    from xsel.encoders import create_encoder, weights_sha256
    from xsel.testing import check_encoder

    encoder = create_encoder(name, "none", image_size=SMALL)  # a ViT is resized (position embeddings) for it
    check_encoder(encoder)
    assert encoder.embedding_dim == TIMM[name]
    config = timm.data.resolve_model_data_config(timm.create_model(name.removeprefix("timm:")))
    assert encoder.preprocessing == {
        "image_size": SMALL,
        "channels": 3,
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "interpolation": config["interpolation"],
        "crop": "center",
        "crop_pct": config["crop_pct"],
    }
    assert weights_sha256(encoder) == weights_sha256(create_encoder(name, "none", image_size=SMALL))


def test_timm_names_and_offline_hub_fail_with_a_way_out(monkeypatch):
    needs("timm", "timm:resnet10t")
    import huggingface_hub.constants

    from xsel.encoders import create_encoder

    with pytest.raises(InputError, match="no model 'resnet10'; did you mean .*timm:resnet10t"):
        create_encoder("timm:resnet10", "none")
    with pytest.raises(InputError, match="no pretrained tag 'nope' for resnet10t; choose one of: c3_in1k"):
        create_encoder("timm:resnet10t.nope", "none")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="cannot download timm's resnet10t .*--weights FILE"):
        create_encoder("timm:resnet10t", "hub")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_local_weights_load_through_timm(tmp_path, suffix, one_torch_thread):
    timm = needs("timm", "timm:resnet10t")
    import safetensors.torch
    import torch

    from xsel.encoders import create_encoder

    torch.manual_seed(9)
    trained = timm.create_model("resnet10t", num_classes=7).eval()  # a fine-tuned model: its head is dropped
    path = tmp_path / f"trained{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(trained.state_dict(), path)
    else:
        torch.save(trained.state_dict(), path)
    encoder = create_encoder("timm:resnet10t", str(path), image_size=SMALL)
    x = torch.randn(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = trained.forward_head(trained.forward_features(x), pre_logits=True)
        assert torch.allclose(encoder(x), expected, atol=1e-5)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(InputError, match="does not load into timm model resnet10t"):
        create_encoder("timm:resnet10t", str(tmp_path / "wrong.pt"))


def export_and_run_at_the_site(cli, tmp_path, encoder: str, weights: str, image_size: int | None):
    """`xsel export` (its own ONNX parity checks at batch 1 and 3), then the bundle's onnxruntime encoder on images
    decoded by the site runtime, against the PyTorch encoder on the same files."""
    import torch

    from xsel.bundle import Bundle
    from xsel.encoders import create_encoder

    out = tmp_path / "bundle"
    size = ["--image-size", str(image_size)] if image_size else []
    result = cli("export", "--encoder", encoder, "--weights", weights, *size, "--out", out)
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(out)
    assert bundle.manifest["parity"]["passed"]
    model = create_encoder(encoder, weights, image_size=image_size)
    assert bundle.encoder["preprocessing"] == model.preprocessing
    files = write_images(tmp_path / "site")
    embeddings, kept, errors = bundle.embed_files(files, batch_size=2, workers=0, show_progress=False)
    assert errors == [] and list(kept) == [0, 1, 2]
    with torch.inference_mode():
        reference = model(torch.from_numpy(np.stack([load_image(f, model.preprocessing) for f in files])))
    np.testing.assert_allclose(embeddings, reference.numpy(), rtol=1e-3, atol=1e-4)
    return bundle


@pytest.mark.parametrize("name", ["timm:resnet10t", "timm:vit_tiny_patch16_224"])
def test_timm_cnn_and_vit_export_to_onnx_and_run_at_a_site(name, cli, tmp_path, one_torch_thread):
    needs("timm", name)
    bundle = export_and_run_at_the_site(cli, tmp_path, name, "none", SMALL)
    assert bundle.encoder["name"] == name and bundle.encoder["preprocessing"]["crop"] == "center"


# --- RAD-DINO -------------------------------------------------------------------------------------------------

TINY_SIZE = 56  # 4×4 patches of 14 px
RAD_DINO_PROCESSOR = {  # microsoft/rad-dino's preprocessor_config.json, with a tiny size
    "crop_size": {"height": TINY_SIZE, "width": TINY_SIZE},
    "do_center_crop": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5307, 0.5307, 0.5307],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.2583, 0.2583, 0.2583],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 64},
}


@pytest.fixture
def tiny_rad_dino(tmp_path):
    """A randomly initialised tiny DINOv2 in RAD-DINO's folder format (config.json, model.safetensors, processor)."""
    transformers = needs("transformers", "rad-dino")
    import torch

    torch.manual_seed(3)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=TINY_SIZE
    )
    folder = tmp_path / "rad-dino"
    transformers.Dinov2Model(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(RAD_DINO_PROCESSOR))
    return folder


def test_rad_dino_from_a_local_folder_meets_the_contract(tiny_rad_dino, one_torch_thread):
    import torch
    from transformers import Dinov2Model

    from xsel.encoders import create_encoder
    from xsel.testing import check_encoder

    encoder = create_encoder("rad-dino", str(tiny_rad_dino))
    check_encoder(encoder)
    assert encoder.embedding_dim == 32
    assert encoder.preprocessing == {
        "image_size": TINY_SIZE,
        "channels": 3,
        "mean": [0.5307] * 3,
        "std": [0.2583] * 3,
        "interpolation": "bicubic",
        "crop": "center",
        "crop_pct": TINY_SIZE / 64,
    }
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cls_token = Dinov2Model.from_pretrained(tiny_rad_dino).eval()(pixel_values=x).last_hidden_state[:, 0]
        assert torch.allclose(encoder(x), cls_token, atol=1e-6)  # the model card's `cls_token`


def test_rad_dino_random_init_has_the_published_architecture_and_preprocessing(one_torch_thread):
    needs("transformers", "rad-dino")
    from xsel_rad_dino.encoder import RAD_DINO_PREPROCESSING

    from xsel.encoders import create_encoder
    from xsel.testing import check_encoder

    encoder = create_encoder("rad-dino", "none")
    assert encoder.embedding_dim == 768 and encoder.preprocessing == RAD_DINO_PREPROCESSING
    assert (encoder.model.config.patch_size, encoder.model.config.num_hidden_layers) == (14, 12)
    encoder.preprocessing = {**encoder.preprocessing, "image_size": 28}  # 2×2 patches: position embeddings interpolate
    check_encoder(encoder)


def test_rad_dino_bad_folders_and_offline_hub(tiny_rad_dino, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from xsel.encoders import create_encoder

    with pytest.raises(InputError, match="not a model folder with config.json"):
        create_encoder("rad-dino", str(tmp_path / "missing"))
    config = json.loads((tiny_rad_dino / "config.json").read_text())
    (tiny_rad_dino / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(InputError, match="expected 'dinov2'"):
        create_encoder("rad-dino", str(tiny_rad_dino))
    (tiny_rad_dino / "config.json").write_text(json.dumps(config))
    processor = {**RAD_DINO_PROCESSOR, "do_center_crop": False}
    (tiny_rad_dino / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(InputError, match="not the short-side resize"):
        create_encoder("rad-dino", str(tiny_rad_dino))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="cannot download microsoft/rad-dino .*--weights rad-dino"):
        create_encoder("rad-dino", "hub")


def test_rad_dino_reads_only_safetensors_never_a_pickled_bin(tiny_rad_dino, tmp_path):
    import torch

    from xsel.encoders import create_encoder

    marker = tmp_path / "ran"
    torch.save({"embeddings.cls_token": RunsCode(marker)}, tiny_rad_dino / "pytorch_model.bin")
    create_encoder("rad-dino", str(tiny_rad_dino))  # model.safetensors beside it: the .bin is never opened
    (tiny_rad_dino / "model.safetensors").unlink()
    with pytest.raises(InputError, match="has no model.safetensors; xsel does not unpickle") as refused:
        create_encoder("rad-dino", str(tiny_rad_dino))
    assert "\n" not in str(refused.value) and "save_pretrained" in str(refused.value)
    assert not marker.exists()


def test_rad_dino_processor_sizes_as_ints_and_malformed_json(tiny_rad_dino):
    from xsel_rad_dino.encoder import preprocessing_from_processor

    from xsel.encoders import create_encoder

    expected = preprocessing_from_processor(RAD_DINO_PROCESSOR, tiny_rad_dino)
    old_style = {**RAD_DINO_PROCESSOR, "size": 64, "crop_size": TINY_SIZE}  # older configs: one int each
    assert preprocessing_from_processor(old_style, tiny_rad_dino) == expected
    for size in ([64, 64], "64", {"height": 64, "width": 64}):
        with pytest.raises(InputError, match="not the short-side resize"):
            preprocessing_from_processor({**RAD_DINO_PROCESSOR, "size": size}, tiny_rad_dino)
    with pytest.raises(InputError, match="preprocessor_config.json: std .* must be above 0"):
        zero_std = {**RAD_DINO_PROCESSOR, "image_std": [0.2583, 0, 0.2583]}
        preprocessing_from_processor(zero_std, tiny_rad_dino / "preprocessor_config.json")
    for name in ("preprocessor_config.json", "config.json"):
        (tiny_rad_dino / name).write_text('{"model_type": "dinov2",')
        with pytest.raises(InputError, match=f"{name}: not valid JSON") as refused:
            create_encoder("rad-dino", str(tiny_rad_dino))
        assert "\n" not in str(refused.value)


def test_rad_dino_exports_to_onnx_and_runs_at_a_site(tiny_rad_dino, cli, tmp_path, one_torch_thread):
    export_and_run_at_the_site(cli, tmp_path, "rad-dino", str(tiny_rad_dino), None)
