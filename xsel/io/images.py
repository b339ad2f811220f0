"""Decode chest X-rays (PNG, JPEG, DICOM) and apply an encoder's preprocessing.

Shared by ``xsel embed`` (PyTorch) and the site runtime (onnxruntime), so both see identical pixels.
Only numpy, Pillow and pydicom are used here: no torch.

Array contract: :func:`read_image` returns a 2-D float32 array in [0, 1] where 1 is bright (bone is
white, MONOCHROME2 convention); :func:`preprocess` returns float32 ``(channels, size, size)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from xsel.errors import InputError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
PREPROCESSING_KEYS = ("image_size", "channels", "mean", "std")
# Optional keys, for encoders whose weights expect more than a plain resize (absent: a plain bilinear resize of the
# whole image, as before): "crop": "center" cuts the centred square of the short side first (torchxrayvision's
# XRayCenterCrop, the same offsets); "crop_pct": f resamples only the central fraction f of each side (timm's eval
# crop); "interpolation" names the resampling filter.
OPTIONAL_PREPROCESSING_KEYS = ("crop", "crop_pct", "interpolation")
RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(ValueError):
    """An image that cannot be read; embedding skips it and lists it in the errors file."""


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the ``DICM`` magic at byte 128 for files without one."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _scale_min_max(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32, copy=False)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return (values - low) / (high - low)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, the formula Pillow's ``convert("L")`` uses."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    if getattr(dataset, "NumberOfFrames", 1) not in (None, 1) and pixels.ndim >= 3:
        pixels = pixels[0]
    if pixels.ndim == 3:  # colour DICOM (RGB): no modality or VOI LUT applies
        return _scale_min_max(_luminance(pixels.astype(np.float32)))
    values = apply_modality_lut(pixels, dataset)  # rescale slope / intercept
    values = apply_voi_lut(values, dataset)  # VOI LUT or window centre / width, when present
    gray = _scale_min_max(values)
    if str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        gray = 1.0 - gray  # MONOCHROME1 stores bright as low values
    return gray


def _read_raster(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("RGBA", "LA"):  # composite on black: transparent means no signal
            alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
            base = np.asarray(image.convert("RGB" if image.mode == "RGBA" else "L"), dtype=np.float32)
            base = _luminance(base) if base.ndim == 3 else base
            return base * alpha / 255.0
        if image.mode == "RGB":
            return _luminance(np.asarray(image, dtype=np.float32)) / 255.0
        if image.mode in ("L", "1"):
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        # 16-bit and float images (I;16, I, F): often 10-12 bit data in a 16-bit container.
        return _scale_min_max(np.asarray(image))


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file to gray float32 in [0, 1], raising :class:`ImageDecodeError`."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # Pillow's warning about a huge image becomes that image's error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            gray = _read_dicom(path) if is_dicom(path) else _read_raster(path)
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"image too large to decode safely: {error}") from None
    except Exception as error:  # decoders raise many types; all mean "this file is unusable"
        raise ImageDecodeError(f"cannot decode image: {type(error).__name__}: {error}") from None
    if gray.ndim != 2 or min(gray.shape) < 2:
        raise ImageDecodeError(f"unexpected image shape {gray.shape}")
    if not np.isfinite(gray).all():
        raise ImageDecodeError("image holds NaN or infinite values")
    return np.ascontiguousarray(gray, dtype=np.float32)


def _crop(gray: np.ndarray, preprocessing: dict) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """Apply ``crop`` and turn ``crop_pct`` into the source box to resample (None: the whole image)."""
    crop, fraction = preprocessing.get("crop"), preprocessing.get("crop_pct")
    if crop is not None:
        if crop != "center":
            raise ValueError(f"preprocessing crop {crop!r} is not supported; use 'center' or leave it out")
        height, width = gray.shape
        side = min(height, width)
        top, left = height // 2 - side // 2, width // 2 - side // 2
        gray = gray[top : top + side, left : left + side]
    if fraction is None:
        return gray, None
    if not 0 < float(fraction) <= 1:
        raise ValueError(f"preprocessing crop_pct must be in (0, 1], got {fraction!r}")
    height, width = gray.shape
    margin_y, margin_x = height * (1 - float(fraction)) / 2, width * (1 - float(fraction)) / 2
    return gray, (margin_x, margin_y, width - margin_x, height - margin_y)


def preprocess(gray: np.ndarray, preprocessing: dict) -> np.ndarray:
    """Crop (optional keys ``crop``, ``crop_pct``), resize to ``image_size`` squared with ``interpolation``
    (default bilinear), replicate to ``channels`` and normalise with ``mean``/``std``."""
    size = int(preprocessing["image_size"])
    channels = int(preprocessing["channels"])
    interpolation = preprocessing.get("interpolation", "bilinear")
    if interpolation not in RESAMPLING:
        raise ValueError(f"preprocessing interpolation {interpolation!r}: use one of {', '.join(RESAMPLING)}")
    gray, box = _crop(gray, preprocessing)
    resized = np.asarray(Image.fromarray(gray).resize((size, size), RESAMPLING[interpolation], box=box), np.float32)
    mean = np.asarray(preprocessing["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocessing["std"], dtype=np.float32).reshape(-1, 1, 1)
    normalised = np.empty((channels, size, size), np.float32)  # written in place: 6× faster than (x - mean) / std
    np.subtract(resized, mean, out=normalised)  # the gray image broadcast to every channel
    return np.divide(normalised, std, out=normalised)


def load_image(path: str | Path, preprocessing: dict) -> np.ndarray:
    """Decode and preprocess one image: the exact input an encoder sees."""
    return preprocess(read_image(path), preprocessing)


def unknown_preprocessing(preprocessing: dict) -> list[str]:
    """Keys this xsel does not apply: a bundle from a newer xsel whose encoder needs them must be refused, not run
    with a plain resize (its embeddings would be silently wrong)."""
    return sorted(set(preprocessing) - {*PREPROCESSING_KEYS, *OPTIONAL_PREPROCESSING_KEYS})


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_preprocessing(preprocessing: dict, *, source: str = "preprocessing") -> None:
    """Refuse values :func:`preprocess` cannot apply, once, where the preprocessing enters (a bundle manifest, an
    encoder): otherwise every image fails alike, deep inside a worker. ``source`` starts the one-line message."""
    if not isinstance(preprocessing, dict):
        raise InputError(f"{source}: expected a mapping of preprocessing keys, got {type(preprocessing).__name__}")
    size, channels = preprocessing.get("image_size"), preprocessing.get("channels")
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
        raise InputError(f"{source}: image_size {size!r} must be a whole number of pixels, at least 1")
    if not isinstance(channels, numbers.Integral) or isinstance(channels, bool) or channels not in (1, 3):
        raise InputError(f"{source}: channels {channels!r} must be 1 or 3")
    for key in ("mean", "std"):
        values = preprocessing.get(key)
        if not isinstance(values, list | tuple) or len(values) != channels or not all(map(_is_number, values)):
            raise InputError(f"{source}: {key} {values!r} must be a list of {channels} finite numbers, one per channel")
    if not all(value > 0 for value in preprocessing["std"]):
        raise InputError(f"{source}: std {preprocessing['std']!r} must be above 0 in every channel")
    if "crop" in preprocessing and preprocessing["crop"] != "center":
        raise InputError(f"{source}: crop {preprocessing['crop']!r} is not supported; use 'center' or leave it out")
    if "crop_pct" in preprocessing:
        fraction = preprocessing["crop_pct"]
        if not _is_number(fraction) or not 0 < fraction <= 1:
            raise InputError(f"{source}: crop_pct {fraction!r} must be a number in (0, 1]")
    interpolation = preprocessing.get("interpolation", "bilinear")
    if not isinstance(interpolation, str) or interpolation not in RESAMPLING:
        raise InputError(f"{source}: interpolation {interpolation!r} is not one of {', '.join(RESAMPLING)}")


def decode_or_error(path: str | Path, preprocessing: dict | None) -> tuple[np.ndarray | None, str | None]:
    """``(array, None)`` for a readable image, ``(None, message)`` for one that is not: the form in which every
    loader (embed, the site runtime, Ray, training, Grad-CAM) passes failures on to its errors file.
    ``preprocessing=None`` returns the gray image as decoded, for loaders that crop and resize it themselves."""
    try:
        return (read_image(path) if preprocessing is None else load_image(path, preprocessing)), None
    except ImageDecodeError as error:
        return None, str(error)
