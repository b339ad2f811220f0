"""Image decoding: every supported format lands as gray float32 in [0, 1] with bright = dense."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xsel.errors import InputError
from xsel.io.images import ImageDecodeError, check_preprocessing, load_image, preprocess, read_image

GRADIENT = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))  # dark left, bright right


def write_dicom(path: Path, stored: np.ndarray, *, photometric="MONOCHROME2", bits_stored=12, **tags) -> Path:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    dataset = pydicom.Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.set_pixel_data(stored.astype(np.uint16), photometric, bits_stored)
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_8bit_gray_png_is_scaled_by_255(tmp_path):
    pixels = (GRADIENT * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), pixels.astype(np.float32) / 255)


def test_16bit_png_with_12bit_data_is_min_max_scaled(tmp_path):
    pixels = (GRADIENT * 4095).round().astype(np.uint16) + 100
    Image.fromarray(pixels).save(tmp_path / "a.png")
    gray = read_image(tmp_path / "a.png")
    assert gray.min() == 0.0 and gray.max() == 1.0
    assert np.allclose(gray, (pixels - 100) / 4095, atol=1e-6)


def test_rgb_and_rgba_become_luminance(tmp_path):
    pixels = (GRADIENT * 255).round().astype(np.uint8)
    Image.fromarray(np.stack([pixels] * 3, -1)).save(tmp_path / "rgb.jpg", quality=100)
    rgba = np.stack([pixels] * 3 + [np.full_like(pixels, 255)], -1)
    rgba[:, :10, 3] = 0  # transparent strip composites on black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.abs(read_image(tmp_path / "rgb.jpg") - pixels / 255).max() < 0.03
    composited = read_image(tmp_path / "rgba.png")
    assert np.all(composited[:, :10] == 0)
    assert np.allclose(composited[:, 10:], pixels[:, 10:] / 255, atol=1e-6)


def test_dicom_rescale_and_window_are_applied(tmp_path):
    stored = (GRADIENT * 4000).round()
    # window 1000..3000 in modality units (slope 1, intercept -1024 → stored 2024..4024)
    path = write_dicom(
        tmp_path / "w.dcm",
        stored,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=2000,
        WindowWidth=2000,
    )
    gray = read_image(path)
    modality = stored - 1024
    assert gray.min() == 0.0 and gray.max() == 1.0
    assert np.all(gray[modality <= 1000] == 0.0), "values below the window are black"
    assert np.all(gray[modality >= 3000] == 1.0), "values above the window are white"
    inside = (modality > 1100) & (modality < 2900)
    assert np.all(np.diff(gray[0][inside[0]]) >= 0) and 0 < gray[inside].mean() < 1


def test_dicom_monochrome1_is_inverted(tmp_path):
    stored = (GRADIENT * 4095).round()
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", stored))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    assert np.array_equal(mono1, 1.0 - mono2)
    assert mono2[:, -1].mean() > mono2[:, 0].mean()


def test_dicom_detected_without_suffix(tmp_path):
    path = write_dicom(tmp_path / "scan", (GRADIENT * 4095).round())
    assert read_image(path).shape == GRADIENT.shape


@pytest.mark.realdata
def test_real_monochrome1_twin_is_exact_inverse(realcxr):
    originals = realcxr / "originals"
    mono2 = read_image(originals / "dicom_cxr_monochrome2.dcm")
    mono1 = read_image(originals / "dicom_cxr_fake_monochrome1.dcm")
    assert mono2.shape == (1024, 1024)
    assert np.array_equal(mono1, 1.0 - mono2)


@pytest.mark.realdata
def test_every_real_original_decodes(realcxr):
    files = sorted(p for p in (realcxr / "originals").iterdir() if p.suffix != ".csv")
    assert len(files) >= 19
    for path in files:
        gray = read_image(path)
        assert gray.dtype == np.float32 and gray.ndim == 2, path.name
        assert gray.min() >= 0.0 and gray.max() <= 1.0 and gray.std() > 0.05, path.name


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_files_raise_decode_error(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        read_image(path)


def test_missing_file_raises_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        read_image(tmp_path / "nope.png")


def test_preprocess_resizes_replicates_and_normalises():
    pre = {"image_size": 32, "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.5, 1.0]}
    out = preprocess(GRADIENT, pre)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    # all channels carry the same gray image, each with its own normalisation
    assert np.allclose(out[0] * 0.25 + 0.5, out[1] * 0.5 + 0.4, atol=1e-6)
    assert np.allclose(out[2] + 0.3, out[0] * 0.25 + 0.5, atol=1e-6)
    assert out[0, :, -1].mean() > out[0, :, 0].mean()


def test_preprocess_normalises_exactly_as_the_formula_stores_were_made_with():
    """Written in place for speed, the result must stay bitwise (x - mean) / std: embeddings already stored were made
    with that formula."""
    pre = {"image_size": 24, "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    gray = np.random.default_rng(0).random((40, 30), dtype=np.float32)
    resized = np.asarray(Image.fromarray(gray).resize((24, 24), Image.Resampling.BILINEAR), np.float32)
    mean, std = (np.asarray(pre[key], np.float32).reshape(-1, 1, 1) for key in ("mean", "std"))
    out = preprocess(gray, pre)
    assert out.flags.c_contiguous and np.array_equal(out, (np.broadcast_to(resized, (3, 24, 24)) - mean) / std)


def test_load_image_matches_read_then_preprocess(tmp_path):
    Image.fromarray((GRADIENT * 255).astype(np.uint8)).save(tmp_path / "a.png")
    pre = {"image_size": 16, "channels": 1, "mean": [0.0], "std": [1.0]}
    assert np.array_equal(load_image(tmp_path / "a.png", pre), preprocess(read_image(tmp_path / "a.png"), pre))


CHECKED = {"image_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": 0}, "image_size 0 must be a whole number"),
        ({"image_size": 32.5}, "image_size 32.5 must be a whole number"),
        ({"image_size": True}, "image_size True must be a whole number"),
        ({"channels": 2}, "channels 2 must be 1 or 3"),
        ({"mean": [0.5]}, r"mean \[0.5\] must be a list of 3 finite numbers"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean .* must be a list of 3 finite numbers"),
        ({"std": "0.25"}, "std '0.25' must be a list of 3"),
        ({"std": [0.25, 0.0, 0.25]}, "std .* must be above 0 in every channel"),
        ({"std": [0.25, -1, 0.25]}, "std .* must be above 0 in every channel"),
        ({"crop": "top"}, "crop 'top' is not supported; use 'center'"),
        ({"crop_pct": 1.2}, r"crop_pct 1.2 must be a number in \(0, 1\]"),
        ({"crop_pct": 0}, "crop_pct 0 must be a number"),
        ({"interpolation": "lanczos2"}, "interpolation 'lanczos2' is not one of bilinear, bicubic"),
        ({"interpolation": ["bicubic"]}, r"interpolation \['bicubic'\] is not one of"),
    ],
)
def test_check_preprocessing_refuses_values_preprocess_cannot_apply(change, message):
    with pytest.raises(InputError, match=f"^manifest.json: {message}") as caught:
        check_preprocessing({**CHECKED, **change}, source="manifest.json")
    assert "\n" not in str(caught.value)


def test_check_preprocessing_accepts_what_preprocess_applies():
    good = [CHECKED, {**CHECKED, "crop": "center", "crop_pct": 0.875, "interpolation": "bicubic"}]
    good.append({"image_size": np.int64(8), "channels": 1, "mean": (np.float32(0.5),), "std": [1 / 2048]})
    for pre in good:
        check_preprocessing(pre)
        assert preprocess(GRADIENT, pre).shape[1:] == (int(pre["image_size"]),) * 2
    with pytest.raises(InputError, match="^preprocessing: expected a mapping"):
        check_preprocessing(None)
