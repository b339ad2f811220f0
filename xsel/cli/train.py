"""``xsel train …``: learn models (``train selector`` from a store, ``train encoder`` from images)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from xsel.cli import app
from xsel.cli.options import Device, Precision, split_list, typed_options
from xsel.errors import InputError

train_app = typer.Typer(
    help="Train models: a learned selector from labelled episodes, a self-supervised encoder from images.",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")


@train_app.command("selector")
def train_selector_command(
    ctx: typer.Context,
    store: Annotated[
        Path, typer.Argument(help="Embedding store with label columns (with --adapt: the site's store, no labels).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: selector.pt, last.pt, metrics.csv.")],
    model: Annotated[
        str, typer.Option(help="lstm (MedSelect's BiLSTM) or set (order-free, sequential picks).")
    ] = "lstm",
    conditions: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated seen conditions to train on, or all: every label column with enough images "
            "(required unless --resume)."
        ),
    ] = None,
    val_conditions: Annotated[
        str | None, typer.Option(help="Comma-separated unseen conditions for validation (required unless --resume).")
    ] = None,
    negative: Annotated[
        str, typer.Option(help="Label column(s) of the negative class, comma-separated (No Finding,Normal).")
    ] = "No Finding",
    uncertain: Annotated[
        str, typer.Option(help="Uncertain labels (-1) count as: positive, negative or ignore.")
    ] = "positive",
    k: Annotated[int, typer.Option("--k", "-k", help="Labels per episode.")] = 20,
    pool_size: Annotated[int, typer.Option(help="Images in each episode's pool.")] = 1000,
    query_size: Annotated[int, typer.Option(help="Images in each episode's query set.")] = 100,
    episodes: Annotated[int, typer.Option(help="Training episodes in total.")] = 20_000,
    batch_size: Annotated[int, typer.Option(help="Episodes per gradient step.")] = 16,
    classifier: Annotated[str, typer.Option(help="Few-shot classifier whose query AUROC is the reward.")] = "cosine",
    use_metadata: Annotated[bool, typer.Option(help="Also feed sex, age and frontal view to the selector.")] = False,
    learning_rate: Annotated[
        float | None,
        typer.Option(help="Adam learning rate, ×0.1 after 60% of the steps [default: lstm 1e-4, set 3e-4]."),
    ] = None,
    hidden: Annotated[
        int | None, typer.Option(min=1, help="Hidden width of the network [default: lstm 256, set 64].")
    ] = None,
    samples: Annotated[
        int, typer.Option(help="set: sequences sampled per episode (each one's baseline is the others' mean).")
    ] = 4,
    balanced: Annotated[
        float, typer.Option(help="Share of steps whose pools are half positive (else natural prevalence).")
    ] = 0.0,
    episodes_within: Annotated[
        str | None,
        typer.Option(
            help="Column naming each image's hospital (e.g. Source, or Institution from xsel scan): a condition's "
            "episodes draw only from the hospitals with positives for it, so a condition one hospital labels is "
            "not learnt as 'this hospital' against the others' normals. The trust gate then also keeps a "
            "reference per hospital, so no training hospital's pools count as foreign."
        ),
    ] = None,
    average_steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Ship a moving average of the weights with a time constant of this many steps, kept at every "
            "validation; 0: the best-validated step [default: set 1000, lstm 0].",
        ),
    ] = None,
    read_embedding: Annotated[
        bool,
        typer.Option(
            help="set: read each embedding itself besides the pool-relative features (--no-read-embedding: "
            "geometry only)."
        ),
    ] = True,
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="set: distil this trained selector.pt (e.g. an LSTM run) — imitate its picks instead of REINFORCE: "
            "an order-free selector with the teacher's gains (BENCHMARKS.md section 13)."
        ),
    ] = None,
    adapt: Annotated[
        Path | None,
        typer.Option(
            help="Adapt this trained selector.pt to STORE without labels: pseudo-tasks from k-means clusters of "
            "STORE's images (conditions and sizes come from the checkpoint). Measured on the realcxr pack, it did "
            "not help at other hospitals: cluster tasks reward what heuristics do (BENCHMARKS.md section 13)."
        ),
    ] = None,
    clusters: Annotated[int, typer.Option(help="--adapt: k-means clusters used as pseudo-conditions.")] = 8,
    choose_fallback: Annotated[
        Path | None,
        typer.Option(
            help="Choose this trained selector.pt's trust-gate fallback on STORE, labelled images from a hospital it "
            "was not trained on: the heuristic or the selector itself, whichever picks best there; says whether "
            "those episodes decided it (the closest candidate's paired margin, 95% CI) (--conditions, --negative)."
        ),
    ] = None,
    referee_away: Annotated[
        Path | None,
        typer.Option(
            help="Choose this trained selector.pt's trust-gate fallback leave-one-hospital-out on STORE, the "
            "labelled store it was trained on: per hospital (--episodes-within, default the run's), a selector "
            "trained without it (--max-minutes each) and every heuristic pick there; the best on average wins."
        ),
    ] = None,
    recalibrate_gate: Annotated[
        Path | None,
        typer.Option(
            help="Calibrate this trained selector.pt's trust gate afresh on STORE, the store it was trained on (same "
            "weights, settings and fallback): for a checkpoint whose gate an earlier xsel calibrated."
        ),
    ] = None,
    fallback_episodes: Annotated[
        int, typer.Option(min=1, help="--choose-fallback, --referee-away: paired episodes per condition.")
    ] = 60,
    val_every: Annotated[int, typer.Option(help="Steps between validations (and checkpoints).")] = 50,
    val_episodes: Annotated[int, typer.Option(help="Fixed validation episodes per validation condition.")] = 20,
    max_minutes: Annotated[
        float, typer.Option(help="Stop after this many minutes, keeping what was validated last or best.")
    ] = 10.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of episodes, sampling and initialisation.")] = 0,
    device: Annotated[
        Device, typer.Option(help="Where the selector trains; auto takes CUDA when present.")
    ] = Device.auto,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint, with its saved settings.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Meta-learn a selector with REINFORCE on labelling episodes of seen conditions, validated on unseen ones:
    MedSelect's BiLSTM (--model lstm) or the set selector (--model set: order-free, one pick at a time; with
    --teacher it imitates a trained selector's picks instead).
    RUN_DIR/selector.pt holds the best-validated step (lstm) or the weights averaged over the run (set); it
    carries a trust gate that falls back to the best heuristic on pools unlike the training ones. --adapt fits a
    trained selector to a site's own images, without labels (its trust gate stays the shipped one); --choose-fallback
    picks that fallback on another hospital's labelled images instead of at home; --referee-away picks it
    leave-one-hospital-out on the store the selector was trained on; --recalibrate-gate gives a checkpoint the
    gate this xsel calibrates.

    [bold]Examples[/bold]

      xsel train selector pool.h5 --conditions Effusion,Cardiomegaly --val-conditions Edema --out runs/sel
      xsel train selector pool.h5 --model set --conditions Effusion,Cardiomegaly --val-conditions Edema --out runs/set
      xsel train selector pool.h5 --model set --conditions all --val-conditions Edema --episodes-within Source \\
          --out runs/set-hospitals                                    # every hospital's labels, kept apart
      xsel train selector pool.h5 --model set --hidden 256 --teacher runs/sel/selector.pt --conditions Effusion \\
          --val-conditions Edema --out runs/set-distilled                 # the LSTM's picks, order-free
      xsel train selector pool.h5 --out runs/sel --resume              # go on with the saved settings
      xsel train selector site.h5 --adapt runs/set/selector.pt --out runs/set-site --max-minutes 3
      xsel train selector other_hospital.h5 --choose-fallback runs/set/selector.pt --conditions Pneumonia \\
          --out runs/set-gated
      xsel train selector pool.h5 --referee-away runs/set-hospitals/selector.pt --max-minutes 5 \\
          --out runs/set-refereed                                      # fallback chosen leave-one-hospital-out
      xsel train selector pool.h5 --recalibrate-gate runs/old/selector.pt --out runs/old-regated
      xsel select pool.h5 --k 20 --checkpoint runs/sel/selector.pt --out to_label.csv
    """
    from xsel.io.outputs import claim_output
    from xsel.train.selector import adapt_selector, load_selector_checkpoint, train_selector
    from xsel.train.selector import choose_fallback as choose_fallback_for
    from xsel.train.selector import recalibrate_gate as recalibrate_gate_of
    from xsel.train.selector import referee_away as referee_away_for

    starts = [
        name
        for name, given in (
            ("--adapt", adapt),
            ("--choose-fallback", choose_fallback),
            ("--referee-away", referee_away),
            ("--recalibrate-gate", recalibrate_gate),
        )
        if given
    ]
    if len(starts) > 1:
        raise InputError(f"{' and '.join(starts)} each start from a checkpoint; use one at a time")
    ctx.with_resource(
        claim_output(
            out, kind="folder", inputs=[store, adapt, choose_fallback, referee_away, recalibrate_gate, teacher]
        )
    )
    if recalibrate_gate is not None:
        path = recalibrate_gate_of(recalibrate_gate, store, out)
        gate = load_selector_checkpoint(path)[0]["trust_gate"]
        typer.echo(
            f"Trust gate recalibrated: falls back to {gate['fallback']} beyond MMD² {gate['threshold']:.4g} → {path}"
        )
        return
    if referee_away is not None:
        choice = referee_away_for(
            referee_away,
            store,
            out,
            column=episodes_within,
            max_minutes=max_minutes,
            episodes=fallback_episodes,
            seed=seed,
            device=device.value,
            show_progress=not quiet,
        )
        _report_fallback(choice)
        return
    if choose_fallback is not None:
        if conditions is None:
            raise InputError("--choose-fallback needs --conditions: the labelled conditions of STORE to pick on")
        choice = choose_fallback_for(
            choose_fallback,
            store,
            out,
            conditions=split_list(conditions, "--conditions"),
            negative=negative,
            episodes=fallback_episodes,
            seed=seed,
            show_progress=not quiet,
        )
        _report_fallback(choice)
        return
    if adapt is not None:
        result = adapt_selector(
            adapt,
            store,
            out,
            clusters=clusters,
            max_minutes=max_minutes,
            seed=seed,
            resume=resume,
            device=device.value,
            show_progress=not quiet,
        )
        _report_selector_training(result)
        return
    settings = {
        "model": model,
        "samples": samples,
        "balanced": balanced,
        "episodes_within": episodes_within or "",
        **({"average_steps": average_steps} if average_steps is not None else {}),
        "read_embedding": read_embedding,
        **({"teacher": str(teacher.resolve())} if teacher is not None else {}),
        "negative": negative,
        "uncertain": uncertain,
        "k": k,
        "pool_size": pool_size,
        "query_size": query_size,
        "episodes": episodes,
        "batch_size": batch_size,
        "classifier": classifier,
        "use_metadata": use_metadata,
        **({"learning_rate": learning_rate} if learning_rate is not None else {}),
        **({"hidden": hidden} if hidden is not None else {}),
        "val_every": val_every,
        "val_episodes": val_episodes,
        "max_minutes": max_minutes,
        "seed": seed,
    }
    for name, value in (("conditions", conditions), ("val_conditions", val_conditions)):
        if value is not None:
            settings[name] = split_list(value, "--" + name.replace("_", "-"))
        elif not resume:
            raise InputError(f"--{name.replace('_', '-')} is required (a resumed run takes it from its checkpoint)")
    if resume:  # the run goes on with its saved settings; only what was typed now is checked against them
        settings = {name: value for name, value in settings.items() if name in typed_options(ctx)}
    result = train_selector(store, out, settings, resume=resume, device=device.value, show_progress=not quiet)
    _report_selector_training(result)


def _report_fallback(choice) -> None:
    from xsel.train.selector import fallback_margin
    from xsel.trust import KEEP_LEARNED

    kept = " (the learned selector keeps picking)" if choice.fallback == KEEP_LEARNED else ""
    typer.echo(f"Trust gate fallback: {choice.fallback}{kept}; {fallback_margin(choice)} → {choice.checkpoint}")


def _report_selector_training(result) -> None:
    kept = "Weights averaged up to" if result.averaged else "Best"
    typer.echo(
        f"Trained {result.steps} steps ({result.episodes} episodes) in {result.seconds / 60:.1f} min, stopped by "
        f"{result.stopped_by}. {kept} step {result.best_step}: validation AUROC {result.best_val_auroc:.3f} "
        f"(random picks: {result.random_val_auroc:.3f}) → {result.run_dir / 'selector.pt'}"
    )


class Method(str, Enum):
    moco = "moco"
    simclr = "simclr"
    byol = "byol"
    swav = "swav"


@train_app.command("encoder")
def train_encoder_command(
    ctx: typer.Context,
    csv: Annotated[Path, typer.Argument(help="CSV with a Path column listing the (unlabeled) images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: encoder.pt, last.pt, metrics.csv.")],
    method: Annotated[Method, typer.Option(help="Self-supervised objective.")] = Method.moco,
    arch: Annotated[str, typer.Option(help="Encoder plugin to pretrain: resnet18, resnet50, densenet121, …")] = (
        "resnet18"
    ),
    weights: Annotated[
        str, typer.Option(help="Starting weights: none (random), imagenet or a state-dict file.")
    ] = "none",
    image_size: Annotated[int, typer.Option(help="Training (and later embedding) size; 96–128 px suit CPUs.")] = 128,
    epochs: Annotated[int, typer.Option(help="Passes over the images (the learning-rate schedule spans them).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Images per step (each seen as two or more views).")] = 64,
    learning_rate: Annotated[float, typer.Option(help="Peak AdamW learning rate of the OneCycle schedule.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this value.")] = 3.0,
    temperature: Annotated[
        float | None, typer.Option(help="Softmax temperature (default: moco/simclr 0.2, swav 0.1).")
    ] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="MoCo: negatives kept in the queue (default 4096, at most half the images).")
    ] = None,
    momentum: Annotated[float, typer.Option(help="MoCo key / BYOL target EMA rate.")] = 0.99,
    prototypes: Annotated[int, typer.Option(help="SwAV: number of prototypes.")] = 100,
    small_crops: Annotated[int, typer.Option(help="SwAV: extra half-size crops (multi-crop).")] = 2,
    balance_by: Annotated[
        str | None, typer.Option(help="Draw images with a WeightedRandomSampler balancing this CSV column's values.")
    ] = None,
    image_root: Annotated[Path | None, typer.Option(help="Folder the CSV's paths are relative to.")] = None,
    probe_store: Annotated[
        Path | None, typer.Option(help="Labelled store whose images probe each checkpoint (few-shot AUROC).")
    ] = None,
    probe_conditions: Annotated[str, typer.Option(help="Comma-separated conditions of the probe.")] = "",
    probe_negative: Annotated[str, typer.Option(help="Probe: label column of the negative class.")] = "No Finding",
    probe_image_root: Annotated[
        Path | None, typer.Option(help="Folder the probe store's paths are relative to (default: the CSV's).")
    ] = None,
    probe_episodes: Annotated[int, typer.Option(help="Probe: episodes per condition (K random labels each).")] = 30,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop after this many minutes (a checkpoint is written; --resume goes on).")
    ] = None,
    precision: Annotated[Precision, typer.Option(help="auto: fp16 AMP on CUDA, fp32 on CPU.")] = Precision.auto,
    workers: Annotated[int | None, typer.Option(help="Image decoding workers (default: half the cores).")] = None,
    seed: Annotated[
        int,
        typer.Option(
            min=0,
            help="Seed of the heads' initialisation, image order and augmentations (--weights none always starts "
            "the backbone from the same seeded network).",
        ),
    ] = 0,
    device: Annotated[Device, typer.Option(help="Where to train; auto takes CUDA when present.")] = Device.auto,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --out from its last checkpoint with its saved settings, folders and device; "
            "an option typed again must match them, except --max-minutes and --workers."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Pretrain an encoder self-supervised (MoCo v2, SimCLR, BYOL or SwAV) on unlabeled radiographs;
    RUN_DIR/encoder.pt then works with `xsel embed` and `xsel export` at the size it was trained at.

    [bold]Examples[/bold]

      xsel train encoder images.csv --method moco --arch resnet18 --image-size 112 --out runs/moco
      xsel train encoder images.csv --method byol --out runs/byol --max-minutes 20 \\
          --probe-store labelled.h5 --probe-conditions Effusion,Edema
      xsel train encoder images.csv --out runs/moco --resume          # go on with the saved settings
      xsel embed images.csv --out pool.h5 --encoder resnet18 --weights runs/moco/encoder.pt
    """
    from xsel.io.outputs import claim_output
    from xsel.train.encoder import train_encoder

    ctx.with_resource(claim_output(out, kind="folder", inputs=[csv if csv.is_file() else None, probe_store]))
    settings = {
        "method": method.value,
        "arch": arch,
        "weights": weights,
        "image_size": image_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "temperature": temperature,
        "queue_size": queue_size,
        "momentum": momentum,
        "prototypes": prototypes,
        "small_crops": small_crops,
        "balance_by": balance_by,
        "probe_conditions": split_list(probe_conditions, "--probe-conditions") if probe_conditions else [],
        "probe_negative": probe_negative,
        "probe_episodes": probe_episodes,
        "precision": precision.value,
        "max_minutes": max_minutes,
        "workers": workers,
        "seed": seed,
    }
    typed = typed_options(ctx)
    if resume:  # the run goes on with its saved settings; only what was typed now is checked against them
        settings = {name: value for name, value in settings.items() if name in typed}
    result = train_encoder(
        csv,
        out,
        settings,
        image_root=image_root,
        probe_store=probe_store,
        probe_image_root=probe_image_root,
        resume=resume,
        device=device.value if "device" in typed else None,  # None: auto, or the resumed run's device
        show_progress=not quiet,
    )
    config = result.config
    probe = f", probe AUROC {result.probe_auroc:.3f}" if result.probe_auroc is not None else ""
    typer.echo(
        f"Pretrained {config.arch} with {config.method} for {result.epochs:.1f} epochs ({result.steps} steps, "
        f"{result.images_per_second:.0f} images/s) in {result.seconds / 60:.1f} min, stopped by {result.stopped_by}; "
        f"final loss {result.final_loss:.3f}{probe} → {result.encoder_path}"
    )


class Loss(str, Enum):
    weighted_bce = "weighted-bce"
    focal = "focal"


@train_app.command("classifier")
def train_classifier_command(
    ctx: typer.Context,
    csv: Annotated[Path, typer.Argument(help="CSV with a [bold]Path[/bold] column and the label columns.")],
    labels: Annotated[str, typer.Option(help="Comma-separated label columns to learn (1/0/-1/blank, or NIH names).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: classifier.pt, metrics.csv, report.csv, roc.png.")
    ],
    store: Annotated[
        Path | None,
        typer.Option(
            help="Fast path: train only a linear head on this store's embeddings (rows matched by Path); the "
            "fine-tuning options (--encoder, --image-size, --batch-size, --device, …) then do not apply."
        ),
    ] = None,
    encoder: Annotated[str, typer.Option(help="Encoder plugin to fine-tune; see `xsel plugins`.")] = "densenet121",
    weights: Annotated[
        str | None, typer.Option(help="Starting weights as in `xsel embed`: none, imagenet or a file.")
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the Path values are relative to (default: the CSV's folder).")
    ] = None,
    loss: Annotated[Loss, typer.Option(help="weighted-bce (class weights from prevalence) or focal (γ=2).")] = (
        Loss.weighted_bce
    ),
    uncertain: Annotated[
        str, typer.Option(help="Uncertain labels (-1) count as: positive, negative or ignore.")
    ] = "positive",
    epochs: Annotated[
        int, typer.Option(help="Training epochs (with --store: linear-probe refits, used by --pseudo-labels).")
    ] = 10,
    image_size: Annotated[int | None, typer.Option(help="Input size in pixels (default: the encoder's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak OneCycle learning rate (default 3e-4; 1e-2 with --store).")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of patients held out for validation.")] = 0.2,
    balanced_sampler: Annotated[
        bool, typer.Option(help="Draw positives and negatives equally often (weighted draws with replacement).")
    ] = False,
    augment: Annotated[bool, typer.Option(help="Light augmentation: small rotation, scale, shift, contrast.")] = True,
    pseudo_labels: Annotated[
        bool,
        typer.Option(
            help="After a warm-up epoch, add confidently predicted unlabeled images (FlexMatch), at most as many "
            "per epoch as labelled ones."
        ),
    ] = False,
    unlabeled: Annotated[
        Path | None, typer.Option(help="More unlabeled images for --pseudo-labels (a CSV with a Path column).")
    ] = None,
    pseudo_threshold: Annotated[float, typer.Option(help="FlexMatch's τ: the threshold of well-learned classes.")] = (
        0.95
    ),
    workers: Annotated[int, typer.Option(help="Decode worker processes (0 = decode in this process).")] = 0,
    device: Annotated[Device, typer.Option(help="Where the network trains; auto takes CUDA when present.")] = (
        Device.auto
    ),
    seed: Annotated[int, typer.Option(min=0, help="Seed of the split, sampling, augmentation and the head.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace the classifier.pt already in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a multi-label classifier on the labelled images of CSV: fine-tune an encoder (default) or fit a
    linear head on a store's embeddings (--store); patient-level validation split, best epoch by mean AUROC.

    [bold]Examples[/bold]

      xsel train classifier labeled.csv --labels Effusion,Edema --out runs/clf --weights imagenet
      xsel train classifier labeled.csv --labels Effusion --out runs/clf --loss focal --balanced-sampler
      xsel train classifier labeled.csv --labels Effusion,Edema --store pool.h5 --out runs/probe
      xsel train classifier labeled.csv --labels Effusion --out runs/clf --pseudo-labels --unlabeled pool.csv
      xsel embed pool.csv --out tuned.h5 --encoder densenet121 --weights runs/clf/classifier.pt
    """
    from xsel.io.outputs import claim_output
    from xsel.train.classifier import ERRORS, ClassifierConfig, train_classifier

    ctx.with_resource(claim_output(out, kind="folder", inputs=[csv, store, unlabeled]))
    config = ClassifierConfig(
        labels=split_list(labels, "--labels"),
        encoder=encoder,
        weights=weights,
        store=None if store is None else str(store),
        loss=loss.value,
        uncertain=uncertain,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        learning_rate=learning_rate,
        val_fraction=val_fraction,
        balanced_sampler=balanced_sampler,
        augment=augment,
        pseudo_labels=pseudo_labels,
        unlabeled=None if unlabeled is None else str(unlabeled),
        pseudo_threshold=pseudo_threshold,
        workers=workers,
        seed=seed,
    )
    result = train_classifier(
        csv, out, config, image_root=image_root, device=device.value, overwrite=overwrite, show_progress=not quiet
    )
    for row in result.report.itertuples():
        typer.echo(f"  {row.label}: AUROC {row.auroc:.3f}, AP {row.ap:.3f}, F1 {row.f1:.3f} at {row.threshold:.3f}")
    skipped = f"; {result.skipped} rows skipped (listed in {result.run_dir / ERRORS})" if result.skipped else ""
    typer.echo(
        f"Trained on {result.train_images} images ({result.val_images} for validation) on {result.device} in "
        f"{result.seconds:.1f} s{skipped}. Best epoch {result.best_epoch}: mean validation AUROC "
        f"{result.best_val_auroc:.3f} → {result.checkpoint}"
    )
