"""Built-in demo data: synthetic, radiograph-like chest images with CheXpert-style labels.

Each image draws a body outline, two lungs with vascular texture, ribs, spine, clavicles and heart;
conditions change the anatomy visibly (enlarged heart, basal effusion with a meniscus, nodules,
patchy opacity, a pneumothorax with a pleural line, collapsed lobe, perihilar edema). Patients keep
their anatomy across follow-up images. Everything is a function of the seed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter

from xsel.errors import InputError
from xsel.io.table import write_csv_atomic

CONDITIONS = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Lung Opacity",
    "Nodule",
    "Pneumothorax",
    "Atelectasis",
    "Edema",
)
NEGATIVE = "No Finding"
PREVALENCE = {
    "Cardiomegaly": 0.2,
    "Pleural Effusion": 0.2,
    "Lung Opacity": 0.2,
    "Nodule": 0.15,
    "Pneumothorax": 0.12,
    "Atelectasis": 0.15,
    "Edema": 0.15,
}


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient shape parameters (fractions of the image size)."""

    body_width: float
    lung_width: float
    lung_height: float
    lung_top: float
    heart_width: float
    tilt: float
    rib_phase: float
    texture_seed: int


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_filter(mask.astype(np.float32), sigma)


def _draw(anatomy: _Anatomy, findings: set[str], view: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    xx = xx + anatomy.tilt * (yy - 0.5)
    image = np.full((size, size), 0.04, dtype=np.float32)
    body = _soft(np.abs((xx - 0.5) / anatomy.body_width) ** 2.5 + np.abs((yy - 0.6) / 0.68) ** 2.5 <= 1.0, 2.0)
    image += 0.42 * body * (1.0 - 0.25 * yy)
    # lungs: air is dark; vascular texture fades toward the periphery
    texture = gaussian_filter(np.random.default_rng(anatomy.texture_seed).normal(size=(size, size)), 1.2)
    lung_cy = anatomy.lung_top + anatomy.lung_height / 2
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * (anatomy.lung_width * 0.5 + 0.045)
        width = anatomy.lung_width * (0.85 if "Atelectasis" in findings and side == 1 else 1.0)
        lung = _ellipse(yy, xx, lung_cy, cx, anatomy.lung_height / 2, width / 2)
        lungs.append((side, cx, lung))
    lung_mask = np.zeros_like(image, dtype=bool)
    for _, _, lung in lungs:
        lung_mask |= lung
    lung_soft = _soft(lung_mask, 1.5)
    image -= 0.3 * lung_soft
    hilum_distance = np.abs(xx - 0.5)
    image += lung_soft * 0.05 * texture * np.clip(1.2 - 3.0 * hilum_distance, 0, 1)
    # ribs: bright arcs across the chest, clavicles higher on AP views
    rib_y = (yy - anatomy.lung_top + 0.08 * (xx - 0.5) ** 2 * 8) * 11.0 + anatomy.rib_phase
    ribs = np.clip(np.cos(2 * np.pi * rib_y), 0.6, 1.0) - 0.6
    image += 0.35 * ribs * body * (yy > anatomy.lung_top - 0.05) * (yy < lung_cy + anatomy.lung_height / 2)
    clavicle_y = anatomy.lung_top - (0.06 if view == "AP" else 0.02)
    image += 0.18 * _soft(np.abs(yy - clavicle_y - 0.15 * np.abs(xx - 0.5)) < 0.012, 0.8) * body
    image += 0.16 * _soft(np.abs(xx - 0.5) < 0.03, 1.0) * body  # spine
    # heart: bright, left of the patient (right of the image); AP magnifies it
    heart_width = anatomy.heart_width * (1.45 if "Cardiomegaly" in findings else 1.0) * (1.08 if view == "AP" else 1.0)
    heart = _soft(_ellipse(yy, xx, lung_cy + 0.14, 0.55, 0.12, heart_width / 2), 2.0)
    image += 0.28 * heart
    if "Pleural Effusion" in findings:
        side = rng.choice([-1, 1])
        for s, cx, lung in lungs:
            if s == side or rng.random() < 0.3:
                level = lung_cy + anatomy.lung_height * rng.uniform(0.12, 0.3)
                meniscus = yy > level - 0.06 * np.abs(xx - cx) / max(anatomy.lung_width, 1e-3)
                image += 0.32 * _soft(lung & meniscus, 1.5)
    if "Nodule" in findings:
        for _ in range(rng.integers(1, 4)):
            _, cx, lung = lungs[rng.integers(0, 2)]
            cy = lung_cy + rng.uniform(-0.3, 0.2) * anatomy.lung_height
            px = cx + rng.uniform(-0.3, 0.3) * anatomy.lung_width
            radius = rng.uniform(0.018, 0.035)
            image += 0.3 * _soft(_ellipse(yy, xx, cy, px, radius, radius), 0.8)
    if "Lung Opacity" in findings:
        _, cx, lung = lungs[rng.integers(0, 2)]
        blob = gaussian_filter(rng.normal(size=(size, size)), size / 18) > 0.02
        region = _ellipse(yy, xx, lung_cy + rng.uniform(-0.15, 0.2), cx, 0.14, 0.1)
        image += 0.22 * _soft(lung & region & blob, 2.0)
    if "Pneumothorax" in findings:
        side, cx, lung = lungs[rng.integers(0, 2)]
        edge = cx + side * anatomy.lung_width * rng.uniform(0.15, 0.3)
        collapsed = lung & ((xx - edge) * side > 0) & (yy < lung_cy + 0.1)
        image = np.where(collapsed, image.min() + 0.06, image)  # no lung markings beyond the pleural line
        image += 0.15 * _soft(np.abs(xx - edge) < 0.006, 0.6) * lung * (yy < lung_cy + 0.1)
    if "Atelectasis" in findings:
        _, cx, lung = lungs[1]
        band = np.abs((yy - lung_cy - 0.08) - 0.3 * (xx - cx)) < 0.025
        image += 0.25 * _soft(lung & band, 1.2)
    if "Edema" in findings:
        butterfly = np.exp(-(((xx - 0.5) / 0.18) ** 2) - ((yy - lung_cy) / 0.2) ** 2)
        image += 0.22 * butterfly * lung_soft
        kerley = (np.abs(np.sin(yy * size * 0.9)) > 0.97) & (np.abs(np.abs(xx - 0.5) - anatomy.lung_width) < 0.05)
        image += 0.12 * (kerley & lung_mask)
    # exposure, detector noise and blur differ per image
    gamma = rng.uniform(0.8, 1.25)
    image = np.clip(image, 0, 1) ** gamma * rng.uniform(0.85, 1.1)
    image += rng.normal(0, 0.015, size=image.shape)
    return np.clip(gaussian_filter(image, 0.6), 0, 1)


def generate_demo_data(out_dir: str | Path, *, n_images: int = 600, image_size: int = 128, seed: int = 0) -> Path:
    """Write ``n_images`` synthetic chest images and ``labels.csv`` into ``out_dir``; return the CSV path.

    Labels follow CheXpert: 1 positive, 0 negative, -1 uncertain, blank unknown; ``No Finding`` is 1 when
    an image has no condition. About one patient in four has a follow-up image.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    patient = None
    for index in range(n_images):
        if patient is None or rng.random() > 0.25:  # a new patient, else a follow-up of the last one
            patient = {
                "id": f"demo{len({r['PatientID'] for r in rows}) + 1:05d}",
                "sex": rng.choice(["F", "M"]),
                "age": int(rng.integers(18, 90)),
                "anatomy": _Anatomy(
                    body_width=rng.uniform(0.4, 0.48),
                    lung_width=rng.uniform(0.3, 0.35),
                    lung_height=rng.uniform(0.55, 0.62),
                    lung_top=rng.uniform(0.12, 0.16),
                    heart_width=rng.uniform(0.28, 0.33),
                    tilt=rng.uniform(-0.05, 0.05),
                    rib_phase=rng.uniform(0, 1),
                    texture_seed=int(rng.integers(0, 2**31)),
                ),
                "findings": {c for c in CONDITIONS if rng.random() < PREVALENCE[c]},
            }
        findings = set(patient["findings"])
        view = "AP" if rng.random() < 0.4 else "PA"
        pixels = _draw(patient["anatomy"], findings, view, image_size, rng)
        name = f"images/{patient['id']}_{index:05d}.png"
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(out_dir / name)
        row = {
            "Path": name,
            "PatientID": patient["id"],
            "Sex": patient["sex"],
            "Age": patient["age"],
            "View": view,
        }
        for condition in CONDITIONS:
            if condition in findings:
                row[condition] = -1.0 if rng.random() < 0.08 else 1.0
            else:
                row[condition] = 0.0 if rng.random() < 0.6 else np.nan
        row[NEGATIVE] = 1.0 if not findings else np.nan
        rows.append(row)
    return write_csv_atomic(pd.DataFrame(rows), out_dir / "labels.csv")


DEMO_MARKER = ".xsel-demo"


def reset_demo_dir(out_dir: str | Path) -> Path:
    """Empty the demo folder: only one that is empty or that an earlier demo marked as its own."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; choose a folder for the demo")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / DEMO_MARKER).is_file():
        raise InputError(f"{out_dir} is not empty and holds no xsel demo; choose another --out folder")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    (out_dir / DEMO_MARKER).write_text("made by `xsel demo`; the next demo run may empty this folder\n")
    return out_dir


ARCHIVE_IMAGES = 160  # demo images also written as a hospital's DICOM archive


def write_demo_archive(out_dir: str | Path, csv: str | Path, *, n_images: int = ARCHIVE_IMAGES, seed: int = 0) -> Path:
    """The first ``n_images`` demo images as a PACS-style DICOM export: nested folders, files without suffix,
    one study per image, DX/CR chest radiographs with the demo's patient, sex, age and view in their tags — plus
    what real archives hold: a few images imported twice (a PACS migration: new study and instance UIDs, the
    same pixels — one image per study keeps both, dedup finds them), MONOCHROME1
    images, a lateral view and an abdomen image. UIDs derive from the seed, so the archive is reproducible."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    out_dir, csv = Path(out_dir), Path(csv)
    labels = pd.read_csv(csv, dtype={"PatientID": str}).head(n_images)
    uid = lambda *parts: generate_uid(entropy_srcs=[str(seed), *map(str, parts)])  # noqa: E731

    def write(row, name: str, *, copy: int = 0, **tags) -> None:
        pixels = np.asarray(Image.open(csv.parent / row.Path).convert("L"), dtype=np.uint16) * 16  # 12-bit
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
        dataset.file_meta.MediaStorageSOPInstanceUID = uid(row.Path, "sop", copy)
        dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
        dataset.StudyInstanceUID = uid(row.Path, "study", copy)
        dataset.SeriesInstanceUID = uid(row.Path, "series", copy)
        dataset.PatientID, dataset.PatientSex, dataset.PatientAge = row.PatientID, row.Sex, f"{int(row.Age):03d}Y"
        dataset.Modality, dataset.BodyPartExamined, dataset.ViewPosition = "DX", "CHEST", row.View
        dataset.StudyDate = "20260101"
        dataset.PhotometricInterpretation = "MONOCHROME2"
        for key, value in tags.items():
            setattr(dataset, key, value)
        if dataset.PhotometricInterpretation == "MONOCHROME1":
            pixels = 4080 - pixels
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.SamplesPerPixel, dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 1, 16, 12, 11
        dataset.PixelRepresentation = 0
        dataset.PixelData = pixels.tobytes()
        target = out_dir / row.PatientID / name
        target.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(target, dataset, enforce_file_format=True)

    for index, row in enumerate(labels.itertuples()):
        write(row, f"IM{index:05d}", PhotometricInterpretation="MONOCHROME1" if index % 7 == 3 else "MONOCHROME2")
    for index, row in enumerate(labels.head(4).itertuples()):  # imported twice: same pixels, new UIDs
        write(row, f"IM{index:05d}-imported-again", copy=1)
    extras = labels.iloc[4:6].itertuples()
    write(next(extras), "LATERAL", copy=2, ViewPosition="LL")
    write(next(extras), "ABDOMEN", copy=3, BodyPartExamined="ABDOMEN")
    return out_dir


# MedSelect's protocol on the demo: train on seen conditions, validate on one, report unseen ones
SEEN = ("Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Pneumothorax")
VALIDATION = ("Nodule",)
UNSEEN = ("Atelectasis", "Edema")
MIN_IMAGES = 400  # fewer leave the rarer conditions without enough images for episodes


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files and what each step returned."""

    out_dir: Path
    csv: Path
    store: Path
    labels: pd.DataFrame
    embed: object  # xsel.embed.EmbedResult
    training: object  # xsel.train.selector.TrainResult
    evaluation: object  # xsel.evaluate.Evaluation
    bundle: Path
    selection: object  # xsel.selection.Selection (site runtime, from the bundle)
    site_matches_workstation: bool
    site: SiteRun


@dataclass(frozen=True)
class SiteRun:
    """The hospital's side of the demo: DICOM archive → scan → constrained selection → certificate → labelling."""

    archive: Path
    scan: object  # xsel.scan.ScanResult
    selection: object  # xsel.selection.Selection
    selection_csv: Path
    certificate: Path
    report: Path
    verified: object  # xsel.certificate.Verification
    label_studio: Path
    cvat: Path


def run_demo(
    out_dir: str | Path,
    *,
    encoder: str = "pixels",
    weights: str | None = None,
    n_images: int = 600,
    image_size: int = 128,
    episodes: int = 20,
    train_minutes: float = 1.0,
    k: int = 20,
    seed: int = 0,
    show_progress: bool = True,
) -> DemoResult:
    """The whole pipeline on synthetic data: generate images, embed them, train a selector on seen
    conditions, compare it with the baselines on unseen ones, export a bundle, and let the bundle pick
    the K images to label exactly as a hospital site would (checked against the workstation's picks)."""
    from xsel.embed import embed
    from xsel.evaluate import evaluate, write_report
    from xsel.selection import select
    from xsel.site import site_select
    from xsel.train.export import export_bundle
    from xsel.train.medselect import SelectorConfig
    from xsel.train.selector import train_selector

    if n_images < MIN_IMAGES:
        raise InputError(
            f"--images {n_images}: use at least {MIN_IMAGES} so every condition has enough images for episodes"
        )
    out_dir = reset_demo_dir(out_dir)
    csv = generate_demo_data(out_dir, n_images=n_images, image_size=image_size, seed=seed)
    store = out_dir / "demo.h5"
    embedded = embed(csv, store, encoder=encoder, weights=weights, show_progress=show_progress)
    pool_size, query_size = max(2 * k, n_images // 3), max(10, min(40, n_images // 15))
    config = SelectorConfig(
        conditions=list(SEEN),
        val_conditions=list(VALIDATION),
        k=k,
        pool_size=pool_size,
        query_size=query_size,
        episodes=4000,
        batch_size=16,
        val_every=10,
        val_episodes=10,
        val_fraction=0.3,
        max_minutes=train_minutes,
        seed=seed,
    )
    run_dir = out_dir / "selector-run"
    training = train_selector(store, run_dir, config, show_progress=show_progress)
    checkpoint = run_dir / "selector.pt"
    selectors = [
        "random",
        "kmedoids",
        "kcenter",
        "typiclust",
        "probcover",
        "oracle-balanced",
        f"medselect={checkpoint}",
    ]
    evaluation = evaluate(
        store,
        list(UNSEEN),
        selectors=selectors,
        k=[k],
        episodes=episodes,
        pool_size=pool_size,
        query_size=query_size,
        seed=seed,
        show_progress=show_progress,
    )
    write_report(evaluation, out_dir / "evaluation")
    bundle = out_dir / "bundle"
    export_bundle(bundle, encoder=encoder, weights=weights, selector=checkpoint)
    selection_csv = out_dir / "selection.csv"
    selection = site_select(csv, bundle, k, out=selection_csv, show_progress=show_progress)
    write_csv_atomic(selection.table, selection_csv)
    workstation = select(store, k, checkpoint=checkpoint, seed=seed)
    matches = selection.table["Path"].tolist() == workstation.table["Path"].tolist()
    site = run_site(out_dir / "site", csv, bundle, k=k, seed=seed, show_progress=show_progress)
    return DemoResult(
        out_dir, csv, store, pd.read_csv(csv), embedded, training, evaluation, bundle, selection, matches, site
    )


def run_site(out_dir: Path, csv: Path, bundle: Path, *, k: int, seed: int, show_progress: bool) -> SiteRun:
    """A hospital site with the bundle: scan its DICOM archive (chest, frontal), select K with one image per study,
    near-duplicates merged and views balanced, write the certificate and report, verify, hand off to labelling."""
    from xsel.certificate import verify, write_certificate
    from xsel.constraints import Constraints
    from xsel.labelling import export_labels
    from xsel.report import write_selection_report
    from xsel.scan import scan_folder, write_scan
    from xsel.site import site_select

    archive = write_demo_archive(out_dir / "pacs", csv, seed=seed)
    scanned = scan_folder(archive, chest_only=True, frontal_only=True, show_progress=show_progress)
    images_csv = out_dir / "images.csv"
    write_scan(scanned, images_csv)
    constraints = Constraints(one_per="study", dedup=0.999, balance=("View",))
    selection_csv = out_dir / "to_label.csv"
    selection = site_select(
        images_csv,
        bundle,
        k,
        out=selection_csv,
        image_root=archive,
        store=out_dir / "site.h5",
        seed=seed,
        constraints=constraints,
        show_progress=show_progress,
    )
    write_csv_atomic(selection.table, selection_csv)
    certificate = write_certificate(selection, selection_csv)
    report = write_selection_report(
        out_dir / "report.html", selection.table, selection.store, pool_rows=selection.pool, image_root=archive
    )
    verified = verify(certificate)
    exports = {
        form: export_labels(
            selection_csv, out_dir / form, format=form, images_csv=images_csv, image_root=archive,
            show_progress=show_progress,
        ).out_dir
        for form in ("label-studio", "cvat")
    }  # fmt: skip
    return SiteRun(archive, scanned, selection, selection_csv, certificate, report, verified, *exports.values())
