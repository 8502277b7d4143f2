"""A member's Ray Train run: data-parallel on two gloo workers gives the one-worker member."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from speclabel.jobs.train import TrainJob, read_model_config, run_training
from speclabel.model import io
from speclabel.model.fit import prepare_arrays

# No dropout and no augmentation: then the only randomness is the batch order, which both runs share
# (each of the two workers takes every other row of the batch one worker would train on). With a
# variance head, so that both of a step's loss terms go through the one all-reduce.
EXACT_MODEL_TOML = """
[arch]
conv_channels = [2, 2]
kernel_size = 5
pool_size = 8
dense_units = [8]
dropout = 0.0
variance_head = true

[train]
epochs = 3
batch_size = 5
learning_rate = 0.003
label_balance = 1.0  # epochs 2 and 3 weigh the labels: the workers must agree

[train.augment]
noise = false

[ensemble]
n_members = 1

[ensemble.split]
test_fraction = 0.2
val_fraction = 0.25
"""


@pytest.mark.ray
def test_two_ddp_workers_train_the_member_one_worker_trains(ray_session, small_survey, setup, tmp_path):
    data = tmp_path / "survey.parquet"
    pq.write_table(small_survey, data, row_group_size=10)
    (tmp_path / "model.toml").write_text(EXACT_MODEL_TOML)
    settings = read_model_config(tmp_path / "model.toml")
    models, lines = {}, {}
    for workers in (1, 2):
        out = tmp_path / f"model-{workers}"
        collected = lines.setdefault(workers, [])
        job = TrainJob(
            data=str(data),
            out=str(out),
            workers_per_member=workers,
            cpus_per_member=1.0,
            streaming="off",
            **settings,
        )
        outcome = run_training(job, echo=collected.append)
        assert [m.workers for m in outcome.members] == [workers]
        models[workers] = (io.load_model(str(out), setup=setup), json.loads((out / "model.json").read_text()))
    assert any("[cpu x2]" in line for line in lines[2])

    (one, one_doc), (two, two_doc) = models[1], models[2]
    # 26 training rows in batches of 5: the last batch has one row, so worker 1's part of it is
    # empty and the step's loss is still the mean over its one row (see DataParallel.step_loss).
    assert one_doc["members"][0]["split"]["n_train"] == 26
    history_one = [h["train_loss"] for h in _history(tmp_path / ".speclabel-train" / "model-1")]
    history_two = [h["train_loss"] for h in _history(tmp_path / ".speclabel-train" / "model-2")]
    # The same arithmetic up to float32 summation order (one sum of 5 rows vs. an all-reduce of two
    # partial sums): a relative 1e-4 is far above that rounding (~1e-6 after 18 Adam steps) and far
    # below what a wrong reduction gives (a mean of per-worker means over 3 + 2 rows is off by ~1e-2).
    assert history_two == pytest.approx(history_one, rel=1e-4)
    assert two_doc["members"][0]["best_val_loss"] == pytest.approx(
        one_doc["members"][0]["best_val_loss"], rel=1e-4
    )
    prepared = prepare_arrays(small_survey, setup)
    flux, mask = prepared["flux"], prepared["mask"]
    got_one, got_two = one.predict(flux, mask), two.predict(flux, mask)
    difference = np.abs(got_one.mean - got_two.mean) / one.scaler.scale
    assert difference.max() < 1e-4  # in units of each label's spread
    # The variance head trains data-parallel to the same weights too (its own term of the step).
    np.testing.assert_allclose(got_two.aleatoric, got_one.aleatoric, rtol=1e-3)


def _history(run_folder):
    """The epoch history in member 0's last checkpoint (its TrainingState JSON), as the run recorded it."""
    checkpoint = json.loads((run_folder / "finished" / "member-0.json").read_text())["checkpoint"]
    return json.loads((run_folder / checkpoint / "state.json").read_text())["history"]
