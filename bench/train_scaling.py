"""Ensemble training: the Ray job (members in parallel) against a plain loop (members one by one).

For 1, 2 and 8 members, in one run on one machine: the wall time of ``model.fit.fit_ensemble`` in
this process (members one after another, torch using every core) and of ``jobs.train.run_training``
on a local Ray instance (one Ray Train run per member, ``--cpus-per-member`` CPUs each), on the same
simulated survey with the same architecture and epochs. Printed per member count: both times, the
Ray/loop ratio (> 1: Ray costs more), the speed-up, and the parallel efficiency = speed-up / members
that can run at once. The Ray instance is started once, before the timings.

    python bench/train_scaling.py                          # ~10-15 min on 2 shared CPUs
    python bench/train_scaling.py --spectra 200 --epochs 2 --members 1 2    # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import pyarrow.parquet as pq
import torch

from speclabel.core.reporting import QUIET
from speclabel.core.setups import get_setup
from speclabel.jobs.train import TrainJob, run_training
from speclabel.model.arch import get_arch
from speclabel.model.fit import EnsembleConfig, fit_ensemble, prepare_arrays
from speclabel.model.training import TrainConfig
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spectra", type=int, default=500, help="survey size (default 500)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per member (default 3)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--arch", default="paper", help="architecture preset or .toml (default paper)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray instance")
    parser.add_argument("--cpus-per-member", type=float, default=1.0)
    parser.add_argument(
        "--fixed-cost-members", type=int, default=8, help="members of the fixed-cost run (default 8)"
    )
    args = parser.parse_args()

    import ray

    setup = get_setup()
    arch = get_arch(args.arch)
    train = TrainConfig(epochs=args.epochs, patience=args.epochs + 1)
    table = simulate_chunk(setup, SurveyConfig(n=args.spectra, seed=7, chunk_size=args.spectra), 0)
    arrays = prepare_arrays(table, setup)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance
    started = time.perf_counter()
    # Never join another Ray instance on a shared machine: its load would be in the timings.
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    slots = max(1, int(args.cpus // args.cpus_per_member))
    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start), "
        f"{time.strftime('%Y-%m-%d')}; {args.spectra} spectra x {setup.n_pixels} px, arch {arch.name}, "
        f"{args.epochs} epochs; loop: torch {torch.get_num_threads()} threads; Ray: {args.cpus} CPUs, "
        f"{args.cpus_per_member:g} per member (started in {ray_start:.1f} s, not counted)"
    )
    print(
        f"{'members':>7} {'loop s':>8} {'ray s':>8} {'ray/loop':>8} {'speed-up':>8} "
        f"{'at once':>7} {'efficiency':>10} {'loop s/member':>13}"
    )
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "survey.parquet")
        pq.write_table(table, data)
        for members in args.members:
            ensemble = EnsembleConfig(n_members=members)
            out = os.path.join(folder, f"model-{members}")
            loop, parallel = loop_and_job_seconds(arrays, data, out, setup, arch, train, ensemble, args)
            at_once = min(members, slots)
            speedup = loop / parallel
            print(
                f"{members:>7} {loop:>8.1f} {parallel:>8.1f} {parallel / loop:>8.2f} {speedup:>8.2f} "
                f"{at_once:>7} {speedup / at_once:>10.2f} {loop / members:>13.1f}",
                flush=True,
            )
        fixed_cost(table, setup, arch, folder, args, slots)
    ray.shutdown()


def loop_and_job_seconds(arrays, data: str, out: str, setup, arch, train, ensemble, args) -> tuple:
    """Wall seconds of the same ensemble fitted by the plain loop (members one after another) and by
    the Ray Train job on the same rows written to ``data``."""
    began = time.perf_counter()
    fit_ensemble(arrays, setup, arch, train, ensemble, data={})
    loop = time.perf_counter() - began
    job = TrainJob(
        data=data,
        out=out,
        arch=arch,
        train=train,
        ensemble=ensemble,
        cpus_per_member=args.cpus_per_member,
        streaming="off",
    )
    began = time.perf_counter()
    run_training(job, reporter=QUIET)  # the job's lines, progress included, go nowhere
    return loop, time.perf_counter() - began


def fixed_cost(table, setup, arch, folder: str, args, slots: int) -> None:
    """What a Ray Train run adds per member beyond its epochs: 8 members of 1 epoch on 32 spectra.

    Per round of members that run at once, the overhead is the job's wall time less the plain loop's
    (members one after another) over the rounds; with 32 spectra and one epoch the compute is a fraction
    of a second, so the number is the Train run's own cost (controller and worker actors, the
    validating scan, checkpoints, assembly and the test-split pass).
    """
    small = table.slice(0, 32)
    members = args.fixed_cost_members
    train = TrainConfig(epochs=1, patience=2)
    ensemble = EnsembleConfig(n_members=members)
    data = os.path.join(folder, "small.parquet")
    pq.write_table(small, data)
    out = os.path.join(folder, "model-small")
    arrays = prepare_arrays(small, setup)
    loop, parallel = loop_and_job_seconds(arrays, data, out, setup, arch, train, ensemble, args)
    rounds = -(-members // slots)
    print(
        f"# fixed cost: {members} members x 1 epoch on 32 spectra: loop {loop:.1f} s, "
        f"Ray job {parallel:.1f} s ({rounds} rounds of {slots}); Train adds "
        f"{(parallel - loop) / rounds:.1f} s per round of members (per member where each has its own CPUs)",
        flush=True,
    )


if __name__ == "__main__":
    main()
