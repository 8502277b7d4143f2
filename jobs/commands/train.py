"""Fit the ensemble's members in parallel with Ray and write one model directory.

Each member is one Ray Train run (a TorchTrainer) that trains that member (train/validation split
by hashed spectrum_id, early stopping, augmentation as configured) with --cpus-per-member CPUs and,
where the cluster has GPUs, one GPU per worker: 8 members on 8 GPUs take the time of one. A member may
train data-parallel on --workers-per-member workers (DDP; each with those CPUs and GPU). Locally it
starts a Ray instance on this machine; with --address or RAY_ADDRESS it uses that cluster.

Every member checkpoints every epoch into the run folder (--storage/--name; by default
<OUT's parent>/.speclabel-train/<OUT's name>). Rerunning the same command, or --resume, continues an
interrupted or failed run: finished members are kept, the others continue from their last epoch.
Rows that fail validation are left out and counted (quarantine.parquet in the run folder).

At the end the members are assembled into OUT (model.json + members/*.safetensors) and the job prints
a table per member and the per-label bias and scatter on the validation and test splits.

Configuration file (--config model.toml; command-line options override it):

  arch = "paper"                 # a preset or an architecture .toml, or an [arch] table
  [train]                        # model.training.TrainConfig: epochs, batch_size, learning_rate, ...
  epochs = 200
  [train.augment]
  noise = true
  [ensemble]                     # model.fit.EnsembleConfig
  n_members = 8
  n_candidates = 10              # train 10, keep the 8 best by validation loss
  [ensemble.split]
  test_fraction = 0.1
  [labels]                       # order = network outputs; default: the paper's five, same-named columns
  teff = { expr = "TEFF", error = "E_TEFF", unit = "K" }
  mgfe = { expr = "MG1 - FEH - 7.53" }   # arithmetic on columns, the --where language of query
  [selection]
  where = "E_TEFF < 150 and SNR > 30"     # cuts before training; each cut's removed rows are printed
  [refine]                       # model.refine.RefineConfig, with --reference-spectra
  neighbours = 80                # reference stars in each local fit
  kept = ["teff", "logg", "feh"] # refined labels the catalogue takes (the others stay the network's)

Labels from a separate catalogue: --label-catalogue FILE.{fits,parquet,csv} --id-column CNAME joins
its rows to the spectra by spectrum_id; a spectrum without a row (or whose row a cut removed) is
quarantined with that reason, catalogue rows without a spectrum are counted. A row lacking some
labels trains the others.
"""

from __future__ import annotations

import argparse

from ._types import (
    add_ray_address,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    stated_default,
)

HELP = "fit the ensemble members in parallel with Ray (resumable) and write a model directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, help="labelled spectra: a Parquet file, folder or glob, local or URI"
    )
    parser.add_argument("--out", required=True, help="model directory to write (local path or URI)")
    parser.add_argument("--config", metavar="TOML", help="model.toml with [arch], [train], [ensemble]")
    # Their defaults are the dataclasses' (or --config's): None here, stated from the code.
    stated_default(
        parser.add_argument(
            "--members", type=positive_int, help="ensemble members (default %(code_default)s, or --config's)"
        ),
        "speclabel.model.fit:EnsembleConfig.n_members",
    )
    stated_default(
        parser.add_argument(
            "--epochs",
            type=positive_int,
            help="maximum epochs per member (default %(code_default)s, or --config's)",
        ),
        "speclabel.model.training:TrainConfig.epochs",
    )
    stated_default(
        parser.add_argument(
            "--continuum-tilt",
            type=non_negative_float,
            metavar="T",
            help="augmentation: multiply each arm of each training spectrum by 1 + t x (x the arm's "
            "wavelength mapped to [-1, 1], t uniform in +-T, e.g. 0.01) (default %(code_default)s, or "
            "--config's)",
        ),
        "speclabel.model.training:TrainConfig.augment.continuum_tilt",
    )
    stated_default(
        parser.add_argument(
            "--density-weighting",
            type=non_negative_float,
            metavar="BETA",
            help="weigh each training row by its local density in (Teff, log g, [Fe/H])^-BETA, at most "
            "density_cap times the mean, so sparse regions of label space count more; 0: off "
            "(default %(code_default)s, or --config's)",
        ),
        "speclabel.model.training:TrainConfig.density_weighting",
    )
    stated_default(
        parser.add_argument(
            "--label-balance",
            type=non_negative_float,
            metavar="ALPHA",
            help="weigh each label's loss by its validation MSE of the epoch before^-ALPHA (mean 1), so "
            "the label with the largest scaled error does not set the shared layers alone: 0.5 trades "
            "[Al/Fe] for Teff, log g and [Fe/H] (docs/model.md); 0: off (default %(code_default)s, or "
            "--config's)",
        ),
        "speclabel.model.training:TrainConfig.label_balance",
    )
    stated_default(
        parser.add_argument(
            "--arch",
            help="architecture preset name or .toml file (default %(code_default)s, or --config's)",
        ),
        "speclabel.model.arch:DEFAULT_ARCH",
    )
    parser.add_argument("--setup", help="instrument setup name or TOML (default: as the input declares)")
    parser.add_argument(
        "--labels",
        metavar="A,B,...",
        help="labels to train, in output order: as [labels] maps them, else same-named columns; "
        "without it, [labels] of --config, else the paper's five (teff,logg,feh,mgfe,alfe)",
    )
    parser.add_argument(
        "--label-catalogue",
        metavar="FILE",
        help="labels from this FITS, Parquet or CSV table, joined to the spectra by --id-column",
    )
    parser.add_argument(
        "--id-column",
        default="spectrum_id",
        help="the --label-catalogue column holding the spectra's spectrum_id (default spectrum_id)",
    )
    parser.add_argument(
        "--exclude",
        metavar="FILE",
        help="Parquet or CSV with a spectrum_id column (e.g. speclabel screen's output): leave those "
        "rows out, counted as excluded",
    )
    parser.add_argument(
        "--reference-spectra",
        metavar="PARQUET",
        help="noise-free reference spectra (a synthetic grid at known labels, same setup and label "
        "columns; e.g. `speclabel simulate --noise-free`) to store in the model: `speclabel label` then "
        "refines the labels by a local fit of each spectrum against them ([refine] in "
        "--config sets the fit); rows of the common test split are left out",
    )
    parser.add_argument(
        "--gpus-per-member",
        choices=("auto", "0", "1"),
        default="auto",
        help="auto (default): 1 where the cluster has GPUs, else 0",
    )
    parser.add_argument(
        "--cpus-per-member", type=positive_float, default=1.0, help="CPUs (and torch threads) per member"
    )
    parser.add_argument(
        "--workers-per-member",
        type=positive_int,
        default=1,
        help="data-parallel (DDP) workers per member, each with --cpus-per-member CPUs and "
        "--gpus-per-member GPUs (default 1)",
    )
    parser.add_argument("--storage", help="folder or URI for run folders (default: beside --out)")
    parser.add_argument("--name", help="run name (default: the name of --out)")
    parser.add_argument("--resume", action="store_true", help="continue the run; fail if there is none")
    parser.add_argument(
        "--max-failures",
        type=non_negative_int,
        default=2,
        help="times a failed member is restarted from its checkpoint within the run (default 2)",
    )
    parser.add_argument(
        "--streaming",
        choices=("auto", "on", "off"),
        default="auto",
        help="stream the rows with Ray Data instead of holding them in memory "
        "(auto: when they would take more than a quarter of a node's memory)",
    )
    add_ray_address(parser)


def build_job(args: argparse.Namespace):
    import dataclasses

    from speclabel.model.arch import get_arch

    from ..train import TrainJob, read_model_config

    settings = read_model_config(args.config) if args.config else {}
    if args.arch:
        settings["arch"] = get_arch(args.arch)
    train = settings.get("train", TrainJob.__dataclass_fields__["train"].default_factory())
    if args.epochs:
        settings["train"] = train = train.replace(epochs=args.epochs)
    if args.continuum_tilt is not None:
        augment = dataclasses.replace(train.augment, continuum_tilt=args.continuum_tilt)
        settings["train"] = train = train.replace(augment=augment)
    if args.density_weighting is not None:
        settings["train"] = train = train.replace(density_weighting=args.density_weighting)
    if args.label_balance is not None:
        settings["train"] = train.replace(label_balance=args.label_balance)
    if args.members:
        from speclabel.model.fit import EnsembleConfig

        ensemble = settings.get("ensemble", EnsembleConfig())
        settings["ensemble"] = dataclasses.replace(ensemble, n_members=args.members)
    if args.setup:
        settings["setup"] = args.setup
    if args.labels:
        from speclabel.pipeline.training_labels import LabelMapping

        names = [n.strip() for n in args.labels.split(",") if n.strip()]
        settings["labels"] = settings.get("labels", LabelMapping()).choose(names)
    return TrainJob(
        label_catalogue=args.label_catalogue,
        id_column=args.id_column,
        data=args.data,
        out=args.out,
        exclude=args.exclude,
        reference_spectra=args.reference_spectra,
        gpus_per_member=args.gpus_per_member,
        cpus_per_member=args.cpus_per_member,
        workers_per_member=args.workers_per_member,
        storage=args.storage,
        name=args.name,
        resume=args.resume,
        max_failures=args.max_failures,
        streaming=args.streaming,
        address=args.address,
        **settings,
    )


def run(args: argparse.Namespace) -> int:
    from speclabel.core.reporting import Reporter, to_stdout

    from ..train import run_training

    outcome = run_training(build_job(args), reporter=Reporter(to_stdout))
    print(
        f"\ntrain: model {outcome.model_id} written to {outcome.out} ({sum(m.kept for m in outcome.members)} "
        f"members) in {outcome.seconds:.0f} s; {outcome.n_input} rows in = {outcome.n_used} used + "
        f"{outcome.n_input - outcome.n_used - outcome.n_excluded} quarantined"
        + (f" + {outcome.n_excluded} excluded" if outcome.n_excluded else "")
        + f"; run folder {outcome.run_path}"
    )
    return 0
