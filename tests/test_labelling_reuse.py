"""labelling/options.py and labelling/reuse.py: option rules, the release, fingerprints, map ids."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speclabel.core.errors import UsageError
from speclabel.model.splits import hash_uniform
from speclabel.pipeline.labelling.options import LabelOptions
from speclabel.pipeline.labelling.reuse import (
    SAMPLE_SALT,
    decide_release,
    options_fingerprint,
    read_id_file,
    selected_map_ids,
)


def test_release_and_option_rules():
    assert decide_release("DR9", ["DR1", "DR2"]) == "DR9"
    assert decide_release(None, ["DR1"]) == "DR1"
    with pytest.raises(UsageError, match="several releases"):
        decide_release(None, ["DR1", "DR2"])
    with pytest.raises(UsageError, match="--release"):
        decide_release(None, [])
    with pytest.raises(UsageError, match="saliency-sample"):
        LabelOptions(saliency="full")
    with pytest.raises(UsageError, match="need --saliency full"):
        LabelOptions(saliency_sample=3)


def test_the_options_fingerprint_follows_what_is_written_not_how_it_is_spread():
    base = options_fingerprint(LabelOptions())
    assert options_fingerprint(LabelOptions(batch_size=7, actors=3, gpus=1)) == base
    assert options_fingerprint(LabelOptions(saliency="none")) != base
    assert options_fingerprint(LabelOptions(members=True)) != base


def test_map_ids_come_from_a_file_and_a_hash_sample(tmp_path):
    (tmp_path / "ids.txt").write_text("# chosen\na\n\nb\n")
    pq.write_table(pa.table({"spectrum_id": ["c", None, "d"]}), tmp_path / "ids.parquet")
    (tmp_path / "ids.csv").write_text("spectrum_id,x\ne,1\n")
    assert read_id_file(str(tmp_path / "ids.txt")) == {"a", "b"}
    assert read_id_file(str(tmp_path / "ids.parquet")) == {"c", "d"}
    assert read_id_file(str(tmp_path / "ids.csv")) == {"e"}
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UsageError, match="no spectrum_id column"):
        read_id_file(str(tmp_path / "bad.parquet"))

    class Source:
        def all_ids(self):
            return [f"s{i}" for i in range(50)]

    ids = Source().all_ids()
    smallest = {ids[i] for i in np.argsort(hash_uniform(ids, SAMPLE_SALT))[:4]}
    options = LabelOptions(saliency="full", saliency_sample=4, saliency_ids=str(tmp_path / "ids.txt"))
    assert selected_map_ids(options, Source()) == frozenset(smallest | {"a", "b"})
    assert selected_map_ids(LabelOptions(), Source()) is None


class _Released:
    """The part of ``publish.Dataset`` the label-set check reads: one release's index entry."""

    location = "cat"

    def __init__(self, entry):
        self.entry = entry

    def release_entry(self, release):
        return self.entry


def test_a_release_keeps_one_label_set():
    from speclabel.core.errors import SpeclabelError
    from speclabel.pipeline.labelling.reuse import check_label_set

    five = ("teff", "logg", "feh", "mgfe", "alfe")
    check_label_set(_Released(None), "DR1", ("teff",), "new")  # a new release takes any label set
    check_label_set(_Released({"model_id": "old"}), "DR1", five, "new")  # entries before label sets: five
    with pytest.raises(SpeclabelError, match=r"holds the labels teff, logg, feh .*--force"):
        check_label_set(_Released({"model_id": "old", "labels": ["teff", "logg", "feh"]}), "DR1", five, "new")
