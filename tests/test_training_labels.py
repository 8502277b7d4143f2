"""Labels from a separate catalogue: the [labels] mapping, selection cuts, the join and its accounting."""

import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from astropy.table import MaskedColumn, Table
from spectra_tables import spectra_table

from speclabel.core.contract import reason_code
from speclabel.core.errors import ConfigError, InputError
from speclabel.pipeline.training_data import resolve_input, scan_in_memory
from speclabel.pipeline.training_labels import (
    LabelMapping,
    join_table,
    label_mapping_from_toml,
    read_label_catalogue,
    selection_table,
    training_labels,
)

GES_TOML = """
[labels]
teff = { expr = "TEFF", error = "E_TEFF", unit = "K" }
logg = { expr = "LOGG", error = "E_LOGG" }
feh  = { expr = "FEH" }
mgfe = { expr = "MG1 - FEH - 7.53" }
alfe = { expr = "AL1 - FEH - 6.37" }
[selection]
where = "E_TEFF < 150 and SNR > 30 and not PECULI"
"""


def ges_catalogue(n=12, seed=0) -> pa.Table:
    """A Gaia-ESO-like label catalogue: CNAME ids, absolute abundances, nulls, a few cut rows."""
    rng = np.random.default_rng(seed)
    columns = {
        "CNAME": [f"s{i}" for i in range(n)],
        "TEFF": rng.uniform(4000, 6500, n),
        "E_TEFF": np.where(np.arange(n) % 5 == 4, 300.0, 60.0),  # rows 4 and 9 fail E_TEFF < 150
        "LOGG": rng.uniform(1, 5, n),
        "E_LOGG": np.full(n, 0.1),
        "FEH": rng.uniform(-2, 0.3, n),
        "MG1": rng.uniform(5.5, 8.0, n),
        "AL1": rng.uniform(4.5, 6.8, n),
        "SNR": np.where(np.arange(n) == 6, 20.0, 80.0),  # row 6 fails SNR > 30
        "PECULI": np.arange(n) == 7,  # row 7 is peculiar
    }
    table = pa.table(columns)
    mg1 = table.column("MG1").to_pylist()
    mg1[1] = mg1[3] = None  # [Mg/Fe] unknown for two stars
    return table.set_column(table.schema.get_field_index("MG1"), "MG1", pa.array(mg1, pa.float64()))


def test_derived_labels_equal_numpy_arithmetic_and_errors_follow_the_mapping():
    catalogue = ges_catalogue()
    mapping = label_mapping_from_toml(tomllib.loads(GES_TOML))
    assert mapping.names == ("teff", "logg", "feh", "mgfe", "alfe") and mapping.definitions[0].unit == "K"
    labels = training_labels(catalogue, LabelMapping(mapping.labels), id_column="CNAME")
    feh = catalogue.column("FEH").to_numpy()
    mg1 = catalogue.column("MG1").to_numpy(zero_copy_only=False)
    mgfe = labels.table.column("mgfe").to_numpy(zero_copy_only=False)
    assert np.allclose(mgfe, mg1 - feh - 7.53, equal_nan=True) and np.isnan(mgfe[[1, 3]]).all()
    alfe = catalogue.column("AL1").to_numpy() - feh - 6.37
    assert np.allclose(labels.table.column("alfe").to_numpy(), alfe)
    assert labels.table.column("teff_err").to_pylist() == catalogue.column("E_TEFF").to_pylist()
    assert "feh_err" not in labels.table.column_names  # no error given, no FEH_err column
    assert labels.table.column("spectrum_id").to_pylist() == catalogue.column("CNAME").to_pylist()


def test_each_selection_cut_is_counted_in_order():
    catalogue = ges_catalogue()
    labels = training_labels(catalogue, label_mapping_from_toml(tomllib.loads(GES_TOML)), id_column="CNAME")
    assert [(c.text, c.removed, c.left) for c in labels.cuts] == [
        ("E_TEFF < 150", 2, 10),
        ("SNR > 30", 1, 9),
        ("not PECULI", 1, 8),
    ]
    assert labels.cut_ids == {
        "s4": "E_TEFF < 150",
        "s9": "E_TEFF < 150",
        "s6": "SNR > 30",
        "s7": "not PECULI",
    }
    printed = selection_table(labels)
    assert "E_TEFF < 150" in printed and "8 stars with labels" in printed


def test_a_join_with_ids_on_one_side_only_accounts_for_every_row(setup, tmp_path):
    spectra = spectra_table(setup, n=10)  # s0 .. s9
    ids = spectra.column("spectrum_id").to_pylist()
    ids[9] = "lonely"  # a spectrum with no catalogue row
    spectra = spectra.set_column(0, "spectrum_id", pa.array(ids))
    pq.write_table(spectra, tmp_path / "spectra.parquet")
    catalogue = ges_catalogue(14)  # s10 .. s13: stars without a spectrum
    cname = catalogue.column("CNAME").to_pylist()
    cname[2] = None  # a row without an id
    cname[11] = cname[12] = " s8 "  # the same star on three rows (padded, as FITS strings are)
    catalogue = catalogue.set_column(0, "CNAME", pa.array(cname))
    mapping = label_mapping_from_toml(tomllib.loads(GES_TOML))
    labels = training_labels(catalogue, mapping, id_column="CNAME", source="ges.fits")
    training_input = resolve_input(str(tmp_path / "spectra.parquet"), setup, labels=labels)
    training_set, rows = scan_in_memory(training_input, setup)

    reasons = dict(
        zip(
            training_set.scan.column("spectrum_id").to_pylist(),
            training_set.scan.column("reason").to_pylist(),
            strict=True,
        )
    )
    assert training_set.n_input == 10 and training_set.n_used == 4  # s0, s1, s3, s5
    assert sorted(sid for sid, r in reasons.items() if r is None) == ["s0", "s1", "s3", "s5"]
    assert reason_code(reasons["s2"]) == "missing_label" and "CNAME = 's2'" in reasons["s2"]
    assert reason_code(reasons["lonely"]) == "missing_label" and "no row of ges.fits" in reasons["lonely"]
    assert "3 rows of ges.fits" in reasons["s8"]
    assert {sid: reason_code(reasons[sid]) for sid in ("s4", "s6", "s7")} == dict.fromkeys(
        ("s4", "s6", "s7"), "not_selected"
    )
    assert "E_TEFF < 150" in reasons["s4"]
    accounting = labels.accounting(reasons)
    assert accounting["catalogue_rows"] == 14
    assert accounting["kept"] == accounting["kept_with_spectrum"] + accounting["kept_without_spectrum"]
    assert accounting["kept_with_spectrum"] == 4 and accounting["kept_without_spectrum"] == 2  # s10, s13
    cut = sum(c["removed"] for c in accounting["removed_by_cuts"])
    assert cut == 4 and accounting["without_id"] == 1 and accounting["duplicated_id_rows"] == 3
    assert 14 == accounting["kept"] + cut + accounting["without_id"] + accounting["duplicated_id_rows"]
    assert "4 joined to a spectrum + 2 without a spectrum" in join_table(accounting)
    # s1 lacks [Mg/Fe] (MG1 is null): it trains the other four labels.
    used = list(rows.arrays["spectrum_id"])
    assert np.isnan(rows.arrays["labels"][used.index("s1"), 3])
    assert np.isfinite(rows.arrays["labels"][used.index("s1"), [0, 1, 2, 4]]).all()
    # Errors mapped for teff and logg only: the others are NaN (the error floor when weighting).
    err = rows.arrays["label_err"]
    assert np.isfinite(err[:, :2]).all() and np.isnan(err[:, 2:]).all()
    assert training_set.label_counts(training_set_split := _no_test())["mgfe"]["rows"] == 2
    assert training_set.label_counts(training_set_split)["teff"]["rows"] == 4


def _no_test():
    from speclabel.model.splits import SplitRule

    return SplitRule(test_fraction=0.0)


def test_fits_parquet_and_csv_catalogues_read_the_same(tmp_path):
    catalogue = ges_catalogue(6).drop_columns(["PECULI"])
    astropy_table = Table()
    for name in catalogue.column_names:
        values = catalogue.column(name).to_pylist()
        if name == "CNAME":
            astropy_table[name] = [f"{v:<16}" for v in values]  # FITS pads strings
        else:
            mask = [v is None for v in values]
            astropy_table[name] = MaskedColumn([0.0 if v is None else v for v in values], mask=mask)
    astropy_table.write(tmp_path / "ges.fits")
    pq.write_table(catalogue, tmp_path / "ges.parquet")
    pacsv.write_csv(catalogue, tmp_path / "ges.csv")
    mapping = LabelMapping(label_mapping_from_toml(tomllib.loads(GES_TOML)).labels)
    tables = [
        training_labels(read_label_catalogue(str(tmp_path / f"ges.{kind}")), mapping, id_column="CNAME").table
        for kind in ("fits", "parquet", "csv")
    ]
    for table in tables[1:]:
        assert table.column_names == tables[0].column_names
        assert table.column("spectrum_id").to_pylist() == [f"s{i}" for i in range(6)]
        for name in table.column_names[1:]:
            a, b = (
                t.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy() for t in (tables[0], table)
            )
            assert np.allclose(a, b, equal_nan=True), name
    assert tables[0].column("spectrum_id").to_pylist() == [f"s{i}" for i in range(6)]
    assert tables[0].column("mgfe").null_count == 2  # masked in FITS, null in Parquet, empty in CSV
    with pytest.raises(InputError, match="unknown file type"):
        read_label_catalogue(str(tmp_path / "ges.txt"))
    with pytest.raises(InputError, match="does not exist"):
        read_label_catalogue(str(tmp_path / "absent.fits"))


def _floats(table, name):
    return table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()


def test_mapping_errors_name_the_label_and_the_problem():
    catalogue = ges_catalogue(4)
    with pytest.raises(ConfigError, match=r"\[labels\] mgfe.*unknown column 'MG2'.*MG1"):
        mapping = label_mapping_from_toml({"labels": {"teff": "TEFF", "mgfe": "MG2 - FEH"}})
        training_labels(catalogue, mapping, id_column="CNAME")
    with pytest.raises(ConfigError, match="must be a number"):
        training_labels(
            catalogue, label_mapping_from_toml({"labels": {"teff": "TEFF > 3"}}), id_column="CNAME"
        )
    with pytest.raises(InputError, match=r"id column.*CNAME"):
        training_labels(catalogue, LabelMapping(), id_column="CNAMES")
    with pytest.raises(ConfigError, match="keys"):
        label_mapping_from_toml({"labels": {"teff": {"column": "TEFF"}}})
    with pytest.raises(ConfigError, match="lower-case"):
        label_mapping_from_toml({"labels": {"Teff": "TEFF"}})


def test_labels_option_picks_mapped_labels_or_same_named_columns():
    mapping = label_mapping_from_toml(tomllib.loads(GES_TOML))
    chosen = mapping.choose(["teff", "cafe"])
    assert (
        chosen.names == ("teff", "cafe")
        and chosen.labels[0].expr == "TEFF"
        and chosen.labels[1].expr == "cafe"
    )
    assert chosen.where == mapping.where and not chosen.plain
    assert LabelMapping().choose(["teff", "logg", "feh"]).plain


def test_the_command_line_and_the_gaia_eso_example_set_the_job_labels():
    from pathlib import Path

    from speclabel.jobs.cli import build_parser
    from speclabel.jobs.commands.train import build_job

    example = Path(__file__).resolve().parents[1] / "examples" / "gaia-eso.toml"
    argv = ["train", "--data", "store", "--out", "m", "--config", str(example)]
    argv += ["--label-catalogue", "ges.fits", "--id-column", "CNAME"]
    job = build_job(build_parser().parse_args(argv))
    assert job.labels.names == ("teff", "logg", "feh", "mgfe", "alfe") and job.labels.where == "E_TEFF < 150"
    assert job.labels.labels[3].expr == "MG1 - FEH - 7.53" and job.train.loss_weighting == "inverse_variance"
    assert (job.label_catalogue, job.id_column) == ("ges.fits", "CNAME")
    job = build_job(build_parser().parse_args([*argv, "--labels", "teff,logg,feh"]))
    assert job.labels.names == ("teff", "logg", "feh") and job.arch.n_outputs == 3
    assert job.labels.labels[0].error == "E_TEFF"
