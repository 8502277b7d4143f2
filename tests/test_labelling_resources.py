"""labelling/resources.py: the actor pool planned on the cluster's CPUs and GPUs."""

import pytest

from speclabel.core.errors import ConfigError
from speclabel.pipeline.labelling.options import LabelOptions
from speclabel.pipeline.labelling.resources import plan_resources, usable_resources


def test_resources_leave_a_cpu_for_reading_and_refuse_impossible_plans():
    plan = plan_resources(LabelOptions(), {"CPU": 2.0})
    assert (plan.actors, plan.cpus_per_actor, plan.threads_per_actor, plan.prepare_cpus) == (2, 0.5, 1, 1.0)
    plan = plan_resources(LabelOptions(batch_size=10), {"CPU": 2.0}, rows=7)
    assert plan.actors == 1  # one batch of work: one actor loads the model, not two
    plan = plan_resources(LabelOptions(), {"CPU": 16.0})
    assert plan.actors == 16 and plan.actors * plan.cpus_per_actor + plan.prepare_cpus <= 16
    plan = plan_resources(LabelOptions(gpus=2), {"CPU": 8.0, "GPU": 4.0})
    assert (plan.actors, plan.gpus_per_actor) == (2, 1)
    with pytest.raises(ConfigError, match="GPUs"):
        plan_resources(LabelOptions(gpus=2), {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="wait forever"):
        plan_resources(LabelOptions(actors=4, cpus_per_actor=1.0), {"CPU": 2.0})


def test_pools_are_planned_on_the_cpus_free_now():
    # A submitted job's driver holds one of the head's CPUs for the whole run.
    total = {"CPU": 2.0, "memory": 1e9}
    usable = usable_resources(total, {"CPU": 1.0, "memory": 1e9})
    assert usable == {"CPU": 1.0, "memory": 1e9}
    plan = plan_resources(LabelOptions(), usable)
    assert plan.actors * plan.cpus_per_actor + plan.prepare_cpus <= 1.0
    assert usable_resources(total, {"CPU": 0.5}) == total  # work still finishing: plan on the total
    assert usable_resources({"CPU": 8.0, "GPU": 2.0}, {"CPU": 7.0, "GPU": 1.0}) == {"CPU": 7.0, "GPU": 2.0}
