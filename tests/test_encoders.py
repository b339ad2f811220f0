"""Encoders: every registered one meets the contract; weights load from every supported source."""

from __future__ import annotations

import pytest
import torch

from xsel import hookimpl, plugins
from xsel.encoders import create_encoder, load_weights, read_state_dict, weights_sha256
from xsel.errors import InputError
from xsel.testing import ContractError, check_encoder

SMALL = 64  # input size that keeps CNN forward passes fast in tests


@pytest.mark.parametrize("name", plugins.names("encoder"))
def test_every_registered_encoder_meets_the_contract(name):
    check_encoder(create_encoder(name, image_size=SMALL))


@pytest.mark.parametrize("name", plugins.names("encoder"))
def test_random_init_is_the_same_in_every_build(name):
    first = create_encoder(name, "none", image_size=SMALL)
    torch.manual_seed(12345)  # the global seed must not matter
    second = create_encoder(name, "none", image_size=SMALL)
    assert weights_sha256(first) == weights_sha256(second)


def test_contract_check_reports_a_broken_encoder():
    broken = torch.nn.Linear(4, 2)
    broken.embedding_dim = 2
    broken.preprocessing = {"image_size": 8, "channels": 2, "mean": [0.0], "std": [1.0]}
    with pytest.raises(ContractError, match="channels must be 1 or 3"):
        check_encoder(broken)


def test_contract_check_catches_batch_dependence():
    class BatchNormalised(torch.nn.Module):
        embedding_dim = 3
        preprocessing = {"image_size": 8, "channels": 1, "mean": [0.0], "std": [1.0]}

        def forward(self, x):
            x = x.flatten(1)[:, :3]
            return x - x.mean(0, keepdim=True)

    with pytest.raises(ContractError, match="rest of the batch"):
        check_encoder(BatchNormalised())


def _reference_resnet18():
    import torchvision

    torch.manual_seed(7)
    return torchvision.models.resnet18(weights=None)


def test_local_state_dict_with_head_loads(tmp_path):
    reference = _reference_resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    encoder = create_encoder("resnet18", str(tmp_path / "r18.pt"))
    assert torch.equal(encoder.conv1.weight, reference.conv1.weight)
    assert encoder.embedding_dim == 512


def test_moco_checkpoint_keeps_the_query_encoder_and_drops_the_head(tmp_path):
    query, key_encoder = _reference_resnet18(), torchvision_resnet18_seeded(99)
    state = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items() if not k.startswith("fc.")}
    state |= {
        "module.encoder_q.fc.0.weight": torch.zeros(2048, 512),
        "module.encoder_q.fc.2.weight": torch.zeros(128, 2048),
    }
    state |= {f"module.encoder_k.{k}": v for k, v in key_encoder.state_dict().items()}
    state |= {"module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {}}, tmp_path / "moco.pth.tar")
    encoder = create_encoder("resnet18", str(tmp_path / "moco.pth.tar"))
    assert torch.equal(encoder.layer4[1].conv2.weight, query.layer4[1].conv2.weight)
    assert not torch.equal(encoder.layer4[1].conv2.weight, key_encoder.layer4[1].conv2.weight)


def torchvision_resnet18_seeded(seed):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None)


def test_encoder_q_prefix_without_module_is_stripped(tmp_path):
    reference = _reference_resnet18()
    torch.save({f"encoder_q.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "q.pt")
    assert set(read_state_dict(tmp_path / "q.pt")) == set(reference.state_dict())


def test_imagenet_weights_load_from_torchvision_cache_without_download(tmp_path, monkeypatch):
    """The real `imagenet` path: torchvision's URL and cache, pre-filled so nothing is downloaded."""
    import torchvision

    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    reference = _reference_resnet18()
    torch.save(reference.state_dict(), checkpoints / url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    encoder = create_encoder("resnet18", "imagenet")
    assert torch.equal(encoder.bn1.running_mean, reference.bn1.running_mean)


def test_densenet_imagenet_weights_load_in_the_layout_torchvision_publishes(monkeypatch):
    """torchvision's DenseNet files still name keys ``denselayer1.norm.1.weight`` (not ``norm1``): loaded."""
    import re

    import torchvision

    reference = torchvision.models.densenet121(weights=None, num_classes=1000)
    published = {  # as in the file: old layer names, and no num_batches_tracked (it predates them)
        re.sub(r"(denselayer\d+\.(?:norm|conv))(\d)", r"\1.\2", key): value
        for key, value in reference.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in published
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda url, **options: dict(published))
    encoder = create_encoder("densenet121", "imagenet", image_size=SMALL)
    layer = encoder.features.denseblock1.denselayer1
    assert torch.equal(layer.norm1.running_var, reference.features.denseblock1.denselayer1.norm1.running_var)
    assert torch.equal(layer.conv2.weight, reference.features.denseblock1.denselayer1.conv2.weight)


def test_imagenet_weights_that_fail_to_download_or_check_are_one_line_input_errors(monkeypatch):
    import torchvision

    def fail(url, **options):
        raise RuntimeError('invalid hash value (expected "a639ec97", got "0000")\nmore')

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fail)
    with pytest.raises(
        InputError, match=r"cannot load torchvision's densenet121 weights \(invalid hash value"
    ) as caught:
        create_encoder("densenet121", "imagenet", image_size=SMALL)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b"garbage"), "cannot read it as PyTorch weights"),
        (lambda p: torch.save({"conv1.weight": torch.zeros(1)}, p), "missing keys: bn1"),
        (lambda p: torch.save(torch.nn.Linear(3, 2).state_dict(), p), "unexpected keys: weight, bias"),
    ],
)
def test_bad_weight_files_are_input_errors(tmp_path, make_file, message):
    path = tmp_path / "w.pt"
    make_file(path)
    with pytest.raises(InputError, match=message):
        create_encoder("resnet18", str(path))


def test_wrong_shapes_are_named(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    model = create_encoder("resnet18", "none")
    with pytest.raises(InputError, match="does not fit ResNet"):
        load_weights(model, tmp_path / "r50.pt", drop_prefixes=("fc.",))


def test_unknown_weight_set_name_is_an_input_error():
    with pytest.raises(InputError, match="file not found"):
        create_encoder("resnet18", "chexpert-v9")


def test_pixels_embeds_the_thumbnail_correlation():
    encoder = create_encoder("pixels")
    image = torch.rand(1, 1, 128, 128)
    brighter = image * 2 + 1  # a linear change of exposure does not change the embedding
    with torch.inference_mode():
        assert torch.allclose(encoder(image), encoder(brighter), atol=1e-4)
        assert encoder(image).shape == (1, 1024)


def test_image_size_override_changes_preprocessing_only():
    assert create_encoder("resnet18", "none", image_size=320).preprocessing["image_size"] == 320
    with pytest.raises(InputError, match="at least 8"):
        create_encoder("pixels", image_size=4)


def test_image_size_too_small_for_the_network_is_an_input_error():
    """DenseNet-121 pools a 28-pixel input to 0×0: refused at creation with the smallest size that runs."""
    with pytest.raises(InputError, match="--image-size 16 is too small for encoder densenet121; use at least 29"):
        create_encoder("densenet121", "none", image_size=16)
    assert create_encoder("densenet121", "none", image_size=29).preprocessing["image_size"] == 29


def test_example_plugin_ships_real_pretrained_weights():
    """The example third-party plugin is installed (entry point) and loads ImageNet weights offline."""
    pretrained = create_encoder("efficientnet-lite0", image_size=SMALL)
    random = create_encoder("efficientnet-lite0", "none", image_size=SMALL)
    assert weights_sha256(pretrained) != weights_sha256(random)
    assert plugins.get("encoder", "effnet-lite0").distribution == "xsel-efficientnet-lite"


def test_example_plugin_recognises_a_cat_through_xsels_own_decoding(tmp_path):
    """The pretrained weights run in the network they were trained in (ReLU6, not swish), fed by xsel's
    grayscale decode and preprocessing: the ImageNet head calls skimage's cat a cat (classes 281–285)."""
    from PIL import Image

    from xsel.io.images import load_image

    cat = pytest.importorskip("skimage.data").chelsea()
    Image.fromarray(cat).save(tmp_path / "cat.png")
    encoder = create_encoder("efficientnet-lite0")
    batch = torch.from_numpy(load_image(tmp_path / "cat.png", encoder.preprocessing))[None]
    with torch.inference_mode():
        probabilities = encoder.net._fc(encoder(batch)).softmax(dim=1)[0]
    assert 281 <= int(probabilities.argmax()) <= 285
    assert float(probabilities[281:286].sum()) > 0.5


def test_an_encoders_declared_architecture_enters_its_identity():
    """Same weights, another network: another hash. Without ``architecture`` the hash is the weights' alone."""
    encoder = torch.nn.Linear(4, 2)
    plain = weights_sha256(encoder)
    encoder.architecture = "linear v2"
    declared = weights_sha256(encoder)
    encoder.architecture = "linear v3"
    assert len({plain, declared, weights_sha256(encoder)}) == 3
    del encoder.architecture
    assert weights_sha256(encoder) == plain


class ZeroStdPlugin:
    """A plugin whose encoder declares a preprocessing that would divide every image by zero."""

    @staticmethod
    @hookimpl
    def register_encoders(register):
        def build(weights=None):
            encoder = torch.nn.Flatten()
            encoder.embedding_dim = 64
            encoder.preprocessing = {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.0]}
            return encoder

        register("zero-std", build)


def test_preprocessing_values_are_checked_when_the_encoder_is_created(tmp_path):
    plugins.register_plugin(ZeroStdPlugin, name="zero-std-plugin")
    try:
        with pytest.raises(InputError, match=r"^encoder 'zero-std' \(plugin 'zero-std-plugin'\) preprocessing: std"):
            create_encoder("zero-std")
    finally:
        plugins.unregister_plugin("zero-std-plugin")
    state = {key: value for key, value in _reference_resnet18().state_dict().items() if not key.startswith("fc.")}
    record = {"encoder": "resnet18", "preprocessing": {"crop_pct": 1.5}}  # a tampered training record
    torch.save({"state_dict": state, "xsel": record}, tmp_path / "encoder.pt")
    with pytest.raises(InputError, match=r"encoder.pt: the preprocessing it records: crop_pct 1.5 must be"):
        create_encoder("resnet18", str(tmp_path / "encoder.pt"))
