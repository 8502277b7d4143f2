"""How a label run spreads over the Ray cluster: actors, their CPUs, GPUs and threads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from speclabel.core.errors import ConfigError

from .options import LabelOptions


@dataclass
class Resources:
    """How the work is spread over the Ray cluster."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: int
    threads_per_actor: int
    prepare_cpus: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def usable_resources(total: dict, available: dict) -> dict:
    """The cluster's resources, with the CPUs that are free now when at least one is: CPUs held for
    the whole run by others, such as the one a job submitted through the Jobs API reserves for its
    driver (``entrypoint_num_cpus``), would otherwise be planned for and the pool would wait for them
    until ``ACTOR_START_TIMEOUT_S``. Fewer than one free CPU (work finishing) falls back to the total."""
    free = float(available.get("CPU", 0.0))
    return {**total, "CPU": free} if free >= 1.0 else dict(total)


def plan_resources(options: LabelOptions, cluster: dict, rows: int | None = None) -> Resources:
    """Actors and CPUs from the cluster's resources.

    With ``gpus``: one actor per GPU (``num_gpus=1``). Without: one actor per CPU, sharing all but
    one CPU, which is left to the read/prepare tasks: actors holding whole CPUs on a small machine
    starve the reads and the job stalls (stack-notes.md). Torch threads per actor follow its CPUs.
    Never more actors than the ``rows`` to label make batches: each actor loads the whole ensemble.
    """
    total_cpus = float(cluster.get("CPU", 0.0))
    total_gpus = float(cluster.get("GPU", 0.0))
    if total_cpus <= 0:
        raise ConfigError("the Ray cluster has no CPUs")
    if options.gpus:
        if options.gpus > total_gpus:
            raise ConfigError(f"--gpus {options.gpus} but the Ray cluster has {total_gpus:g} GPUs")
        actors = options.gpus
        cpus = options.cpus_per_actor or 1.0
        prepare_cpus = 1.0
        gpus = 1
    else:
        reserve = 1.0 if total_cpus >= 2 else total_cpus / 2
        actors = options.actors or max(1, int(total_cpus))
        cpus = options.cpus_per_actor or (total_cpus - reserve) / actors
        prepare_cpus = min(1.0, reserve)
        gpus = 0
    if rows is not None:
        actors = max(1, min(actors, -(-rows // options.batch_size)))
    if actors * cpus + prepare_cpus > total_cpus + 1e-9:
        raise ConfigError(
            f"{actors} actors x {cpus:g} CPUs plus {prepare_cpus:g} CPU for reading need more than the "
            f"cluster's {total_cpus:g} CPUs: the job would wait forever; "
            "use fewer --actors or a smaller --cpus-per-actor"
        )
    threads = options.threads_per_actor or max(1, round(cpus))
    return Resources(actors, round(cpus, 4), gpus, threads, prepare_cpus)
