"""core.storage: paths and URIs, input discovery, atomic files and folders, JSON, listings."""

import json
import os

import pyarrow.fs as pafs
import pytest

from speclabel.core import storage
from speclabel.core.errors import InputError


def _tree(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


def _object_store(root) -> pafs.FileSystem:
    """A filesystem that is not a LocalFileSystem, so storage takes its object-store branch
    (open_output_stream + copy_file + delete_file, no rename), over a local folder we can inspect."""
    root.mkdir(parents=True, exist_ok=True)
    return pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())


def test_local_paths_and_file_uris_open_the_local_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.filesystem_and_path("data/x.parquet")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "data" / "x.parquet")
    fs, path = storage.filesystem_and_path(tmp_path / "y")  # os.PathLike
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "y")
    fs, path = storage.filesystem_and_path(f"file://{tmp_path}/z.csv")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/z.csv"
    assert storage.is_local("a/b") and storage.is_local(f"file://{tmp_path}")
    assert not storage.is_local("s3://bucket/key")
    with pytest.raises(InputError, match="cannot open 'nosuch://x/y'"):
        storage.filesystem_and_path("nosuch://x/y")


def test_join_makes_one_slash_between_parts():
    assert (
        storage.join("s3://b/cat/", "/release=DR1/", "part-0.parquet")
        == "s3://b/cat/release=DR1/part-0.parquet"
    )
    assert storage.join("/data", "a") == "/data/a"


def test_resolve_files_finds_inputs_and_skips_side_folders(tmp_path):
    root = tmp_path / "in"
    _tree(
        root,
        [
            "a.parquet",
            "B.PARQUET",
            "notes.txt",
            "sub/c.parquet",
            "sub/deeper/d.parquet",
            "sub/_e.parquet",  # hidden by its own name
            "_quarantine/release=R/f.parquet",  # hidden by a folder name
            ".cache/g.parquet",
            "sub/.tmp-h.parquet",  # an atomic write in progress
        ],
    )
    fs, files = storage.resolve_files(root, (".parquet",))
    assert isinstance(fs, pafs.LocalFileSystem)
    visible = ("B.PARQUET", "a.parquet", "sub/c.parquet", "sub/deeper/d.parquet")  # sorted, any case
    assert files == [f"{root}/{n}" for n in visible]
    # No extension filter: every visible file.
    assert storage.resolve_files(root, ())[1] == sorted([*files, f"{root}/notes.txt"])
    # A file URI names the same files.
    assert storage.resolve_files(f"file://{root}", (".parquet",))[1] == files
    # A file named directly is read whatever its name.
    assert storage.resolve_files(root / "sub" / "_e.parquet", (".parquet",))[1] == [f"{root}/sub/_e.parquet"]


def test_resolve_files_matches_globs_below_the_first_wildcard(tmp_path):
    root = tmp_path / "in"
    _tree(root, ["a1.parquet", "a2.parquet", "b.parquet", "sub/a3.parquet", "sux/c.parquet", "_x/a4.parquet"])
    assert storage.resolve_files(f"{root}/a?.parquet", (".parquet",))[1] == [
        f"{root}/a1.parquet",
        f"{root}/a2.parquet",
    ]
    assert storage.resolve_files(f"{root}/su[bx]/*.parquet", (".parquet",))[1] == [
        f"{root}/sub/a3.parquet",
        f"{root}/sux/c.parquet",
    ]
    # The hidden-name rule applies below the listed folder as well: _x/a4.parquet is never input.
    with pytest.raises(InputError, match="no files found"):
        storage.resolve_files(f"{root}/*a4.parquet", ())
    with pytest.raises(InputError, match=r"no \.parquet files found"):
        storage.resolve_files(f"{root}/z*.parquet", (".parquet",))


def test_resolve_files_errors_name_the_input(tmp_path):
    with pytest.raises(InputError, match=f"input '{tmp_path}/missing' does not exist"):
        storage.resolve_files(tmp_path / "missing", (".parquet",))
    _tree(tmp_path / "only_text", ["a.txt", "_hidden.parquet"])
    with pytest.raises(InputError, match=r"no \.parquet/\.fits files found"):
        storage.resolve_files(tmp_path / "only_text", (".parquet", ".fits"))


@pytest.mark.parametrize("kind", ["local", "object_store"])
def test_atomic_output_leaves_no_partial_file_when_the_writer_raises(tmp_path, kind):
    folder = tmp_path / "out"
    if kind == "local":
        fs, target = pafs.LocalFileSystem(), f"{folder}/sub/result.bin"
    else:
        fs, target = _object_store(folder), "sub/result.bin"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with storage.atomic_output(fs, target) as out:
            out.write(b"half a file")
            raise RuntimeError("disk on fire")
    assert [files for _, _, files in os.walk(folder) if files] == []
    # A complete write appears whole; a failed rewrite leaves the old content as it was.
    storage.write_bytes_atomic(fs, target, b"version 1")
    with pytest.raises(RuntimeError):
        with storage.atomic_output(fs, target) as out:
            out.write(b"version 2, partly")
            raise RuntimeError("interrupted")
    assert (folder / "sub" / "result.bin").read_bytes() == b"version 1"
    assert sorted(os.listdir(folder / "sub")) == ["result.bin"]


def test_write_folder_atomic_replaces_the_folder_or_leaves_it(tmp_path):
    root = tmp_path / "model"
    fs = pafs.LocalFileSystem()
    storage.write_folder_atomic(root, {"weights/0.pt": b"w0", "model.json": b"{}"})
    assert storage.files_under(fs, str(root)) == [f"{root}/model.json", f"{root}/weights/0.pt"]
    # A new version holds exactly its own files: the old member's weights are gone.
    storage.write_folder_atomic(root, {"weights/1.pt": b"w1", "model.json": b'{"v": 2}'})
    assert storage.files_under(fs, str(root)) == [f"{root}/model.json", f"{root}/weights/1.pt"]
    # A writer that fails half-way (the second file is not bytes) leaves the previous version whole.
    with pytest.raises(TypeError):
        storage.write_folder_atomic(root, {"weights/2.pt": b"w2", "model.json": "not bytes"})
    assert (root / "model.json").read_bytes() == b'{"v": 2}'
    assert sorted(os.listdir(root / "weights")) == ["1.pt"]
    assert os.listdir(tmp_path) == ["model"]  # no staging or retired folder left beside it


def test_write_folder_atomic_on_an_object_store_writes_in_order_and_drops_stale_files(tmp_path, monkeypatch):
    fs = _object_store(tmp_path / "bucket")
    monkeypatch.setattr(storage, "filesystem_and_path", lambda location: (fs, location))
    storage.write_folder_atomic("model", {"weights/0.pt": b"w0", "weights/1.pt": b"w1", "model.json": b"1"})
    written = []
    write = storage.write_bytes_atomic
    monkeypatch.setattr(
        storage, "write_bytes_atomic", lambda fs, path, data: (written.append(path), write(fs, path, data))
    )
    storage.write_folder_atomic("model", {"weights/1.pt": b"W1", "model.json": b"2"})
    assert written == ["model/weights/1.pt", "model/model.json"]  # the commit file last, as given
    assert storage.files_under(fs, "model") == ["model/model.json", "model/weights/1.pt"]
    assert (tmp_path / "bucket" / "model" / "weights" / "1.pt").read_bytes() == b"W1"


def test_json_round_trip_is_sorted_and_ends_with_a_newline(tmp_path):
    fs = pafs.LocalFileSystem()
    path = f"{tmp_path}/deep/settings.json"
    document = {"z": [1, 2.5, None], "a": {"name": "Mg I", "ok": True}, "é": "ü"}
    storage.write_json_atomic(fs, path, document)
    assert storage.read_json(fs, path) == document
    text = (tmp_path / "deep" / "settings.json").read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"z"') < text.index('"\\u00e9"')
    assert json.loads(text) == document


def test_files_under_lists_files_recursively_or_nothing(tmp_path):
    fs = pafs.LocalFileSystem()
    assert storage.files_under(fs, f"{tmp_path}/nothing") == []
    assert not storage.exists(fs, f"{tmp_path}/nothing")
    _tree(tmp_path / "d", ["b.parquet", "a/x.json", "a/_y"])
    (tmp_path / "d" / "empty").mkdir()
    assert storage.exists(fs, f"{tmp_path}/d/a")
    # Every file, hidden names included (this lists side folders too), never a directory.
    assert storage.files_under(fs, f"{tmp_path}/d") == [
        f"{tmp_path}/d/a/_y",
        f"{tmp_path}/d/a/x.json",
        f"{tmp_path}/d/b.parquet",
    ]
