"""A model's own label set end to end: a 3-label model trained, labelling, queried, summarised, evaluated
and served with no column of the other labels anywhere; a release keeps one label set."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny import TINY_ARCH
from train_inputs import tiny_model_toml

from speclabel.jobs.cli import main
from speclabel.model.arch import build_network
from speclabel.model.ensemble import Ensemble
from speclabel.model.io import save_model
from speclabel.model.scaling import LabelScaler
from speclabel.pipeline.catalogue.flight import connect, serve

THREE = ("teff", "logg", "feh")
OTHERS = ("mgfe", "alfe")
TOKEN = "0123456789abcdef0123456789abcdef"


def _no_other_label(names) -> bool:
    return not any(other in name for name in names for other in OTHERS)


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory, small_survey, ray_session):
    root = tmp_path_factory.mktemp("label-sets")
    survey = small_survey.drop_columns([c for c in small_survey.column_names if c.startswith(OTHERS)])
    pq.write_table(survey, root / "survey.parquet", row_group_size=10)
    pq.write_table(survey.select(["spectrum_id", *THREE]), root / "truth.parquet")
    config = tiny_model_toml(root / "model.toml", epochs=1, members=2)
    data = str(root / "survey.parquet")
    argv = ["train", "--data", data, "--out", str(root / "model"), "--config", str(config)]
    assert main([*argv, "--labels", ",".join(THREE)]) == 0
    catalogue = str(root / "cat")
    label = ["label", "--spectra", data, "--model", str(root / "model"), "--out", catalogue]
    assert main([*label, "--release", "DR1", "--batch-size", "16", "--quiet"]) == 0
    return {"root": root, "data": data, "catalogue": catalogue, "model": str(root / "model")}


def test_a_three_label_model_declares_its_labels_and_counts_their_rows(three_labels):
    document = json.loads((three_labels["root"] / "model" / "model.json").read_text())
    assert document["labels"] == list(THREE) and document["arch"]["n_outputs"] == 3
    assert [d["name"] for d in document["label_definitions"]] == list(THREE)
    assert document["label_definitions"][0]["unit"] == "K"
    assert set(document["training"]["data"]["label_rows"]) == set(THREE)
    assert set(document["metrics"]["test"]["all"]) == set(THREE)


def test_catalogue_query_stats_evaluate_and_flight_follow_the_model_labels(three_labels, tmp_path, capsys):
    catalogue = three_labels["catalogue"]
    files = list((three_labels["root"] / "cat").rglob("part-*.parquet"))
    schema = pq.read_schema(files[0])
    assert {*THREE, *(f"{n}_std" for n in THREE)} <= set(schema.names) and _no_other_label(schema.names)
    index = json.loads((three_labels["root"] / "cat" / "_index.json").read_text())
    assert index["releases"]["DR1"]["labels"] == list(THREE)

    out = tmp_path / "poor.parquet"
    assert main(["query", catalogue, "--where", "feh < 5 and logg_std >= 0", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 40 and _no_other_label(pq.read_schema(out).names)
    capsys.readouterr()
    assert main(["stats", catalogue, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert "teff" in json.dumps(stats) and _no_other_label(json.dumps(stats).split('"'))

    report = tmp_path / "report"
    truth = str(three_labels["root"] / "truth.parquet")
    assert main(["evaluate", "--catalogue", catalogue, "--truth", truth, "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["metrics"]["all"]) == set(THREE)
    assert _no_other_label(json.dumps(metrics).split('"'))

    server = serve(catalogue, port=0, host="127.0.0.1", token=TOKEN)
    try:
        with connect(server.url, TOKEN) as client:
            served = client.query("teff > 0", columns=["spectrum_id", *THREE])
            assert served.num_rows == 40 and _no_other_label(client.schema().names)
    finally:
        server.shutdown()


def test_a_model_of_another_label_set_is_refused_on_the_release_unless_forced(three_labels, setup, capsys):
    labels = np.array([[4500.0, 2.5, -0.3, 0.2, 0.1], [5800.0, 4.4, 0.1, 0.0, -0.05]])
    arch = TINY_ARCH.replace(n_outputs=5)
    five = Ensemble(setup, arch, LabelScaler.fit(labels), [build_network(arch, setup)])
    model = str(three_labels["root"] / "five")
    save_model(five, model)
    label = ["label", "--spectra", three_labels["data"], "--model", model, "--out", three_labels["catalogue"]]
    label += ["--release", "DR1", "--batch-size", "16", "--quiet"]
    capsys.readouterr()
    assert main(label) == 1
    error = capsys.readouterr().err
    assert "holds the labels teff, logg, feh" in error and "mgfe" in error and "--force" in error
    assert main([*label, "--force"]) == 0
    files = list((three_labels["root"] / "cat").glob("release=DR1/**/part-*.parquet"))
    assert {"mgfe", "alfe"} <= set(pq.read_schema(files[0]).names)
