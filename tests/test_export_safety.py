"""What ``export`` may replace and how it fails, what loading an export may run, and which
evaluation an export records (issue 30: items 1, 4, 12 and 15)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from twotower_rec.errors import ExportError
from twotower_rec.serving.exported import ExportedModel
from twotower_rec.serving.manifest import FORMAT_VERSION, sha256


def _export(pipeline, out, checkpoint=None, overrides=()):
    """``export`` in this process (the pipeline's checkpoint by default) into ``out``."""
    from twotower_rec.api import export

    cfg = pipeline.load_config(["export.ann=none", *overrides])
    return export(cfg, checkpoint=checkpoint, out=out)


# --- item 1: export replaces only an export --------------------------------------------------------


def test_export_refuses_a_folder_that_is_not_an_export(pipeline, tmp_path):
    """``export --out runs/x`` over a run folder wiped its checkpoints: a non-empty folder that is
    not an export is refused, and nothing in it is touched."""
    target = tmp_path / "run_folder"
    (target / "checkpoint").mkdir(parents=True)
    (target / "checkpoint" / "meta.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=f"{target}.*not an export") as caught:
        _export(pipeline, target)
    assert "\n" not in str(caught.value)
    assert (target / "notes.txt").read_text() == "mine" and (target / "checkpoint" / "meta.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run_folder.")]  # no temporary left


def test_export_writes_into_an_empty_or_missing_folder_and_replaces_an_export(pipeline, tmp_path):
    """An empty folder, an earlier export and a missing folder are each written; a replaced export
    holds exactly the new manifest's files (the old ones and any temporary are gone)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(pipeline, empty) == empty
    first = ExportedModel.load(empty)
    (empty / "stale.txt").write_text("from an earlier export")
    _export(pipeline, empty)  # an earlier export is replaced
    second = ExportedModel.load(empty)
    assert not (empty / "stale.txt").exists()
    manifest = json.loads((empty / "manifest.json").read_text())
    assert {p.name for p in empty.iterdir()} == {"manifest.json", *manifest["files"]}
    np.testing.assert_array_equal(second.item_ids, first.item_ids)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".empty.")]  # no temporary left
    new = tmp_path / "new" / "export"
    _export(pipeline, new)
    assert ExportedModel.load(new).item_embeddings.shape == first.item_embeddings.shape


# --- item 15: a write that fails is an ExportError, the old export stays -------------------------------


def test_a_failed_write_is_an_export_error_and_keeps_the_old_export(pipeline, tmp_path, monkeypatch):
    """A full disk while writing the query tower (``torch.jit.save`` to a path aborted the process
    in C++ before): ``ExportError`` naming the folder, the previous export whole, no temporary left."""
    from twotower_rec.export import writer

    out = tmp_path / "export"
    _export(pipeline, out)
    before = (out / "manifest.json").read_text()
    real_open = open

    def full_disk(path, *args, **kwargs):
        if str(path).endswith("query_tower.pt2"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(writer, "open", full_disk, raising=False)
    with pytest.raises(ExportError, match=f"cannot write the export {out}.*No space left") as caught:
        _export(pipeline, out)
    assert "\n" not in str(caught.value)
    assert (out / "manifest.json").read_text() == before
    ExportedModel.load(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]


def test_a_large_query_tower_is_written_only_where_it_fits(pipeline, tmp_path, monkeypatch):
    """A tower larger than IN_MEMORY_BYTES is written only once the folder is seen to have room for
    it (a TorchScript one is written by torch to the path, which aborts on a full disk)."""
    from twotower_rec.export import writer

    monkeypatch.setattr(writer, "IN_MEMORY_BYTES", 0)
    out = _export(pipeline, tmp_path / "export", overrides=["export.torchscript=true"])  # .pt by torch to its path
    ExportedModel.load(out)
    monkeypatch.setattr(writer, "_free_bytes", lambda folder: 1 << 20)
    with pytest.raises(ExportError, match=f"cannot write the export {out}: 1 MiB free, the query tower needs"):
        _export(pipeline, out)
    ExportedModel.load(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not bind root")
def test_a_read_only_parent_folder_is_an_export_error(pipeline, cli, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = cli("export", "--config", pipeline.config_path, "--out", parent / "export", cwd=pipeline.root)
    finally:
        parent.chmod(0o755)
    assert result.returncode == 2, result.describe()
    assert f"error: cannot write the export {parent / 'export'}" in result.stderr


# --- item 4: no pickles ----------------------------------------------------------------------------


@pytest.fixture
def copy(pipeline, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(pipeline.export_dir, target)
    return target


class _Planted:
    """An object whose unpickling creates ``marker``: what a tampered export would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _fix_checksum(export, name: str) -> None:
    """Rewrite the manifest's entry for ``name`` (checksums detect damage, not tampering)."""
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (export / name).stat().st_size, "sha256": sha256(export / name)}
    (export / "manifest.json").write_text(json.dumps(manifest))


def test_loading_refuses_pickled_item_ids_without_running_them(copy, tmp_path):
    marker = tmp_path / "pickle-ran"
    n = len(np.load(copy / "item_ids.npy", allow_pickle=False))
    np.save(copy / "item_ids.npy", np.array([_Planted(str(marker))] * n, dtype=object), allow_pickle=True)
    _fix_checksum(copy, "item_ids.npy")
    with pytest.raises(ExportError, match="item_ids.npy.*pickled.*export again") as caught:
        ExportedModel.load(copy)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_loading_refuses_pickled_user_ids_without_running_them(copy, tmp_path):
    marker = tmp_path / "pickle-ran"
    users = dict(np.load(copy / "users.npz", allow_pickle=False))
    users["raw_user_ids"] = np.array([_Planted(str(marker))] * len(users["raw_user_ids"]), dtype=object)
    np.savez(copy / "users.npz", **users)
    _fix_checksum(copy, "users.npz")
    with pytest.raises(ExportError, match="users.npz.*pickled.*export again"):
        ExportedModel.load(copy)
    assert not marker.exists()


def test_an_export_of_the_format_that_needed_pickles_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=f"format version 3, this package reads {FORMAT_VERSION}: this export was "
                                          "written by an older version; run `twotower-rec export` again"):
        ExportedModel.load(copy)
    assert FORMAT_VERSION >= 4


def _as_format_4(export) -> None:
    """Make ``export`` what format 4 wrote: a TorchScript ``query_tower.pt``, no ``.pt2``, no ``hashed`` entry."""
    (export / "query_tower.pt2").rename(export / "query_tower.pt")
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["format_version"] = 4
    manifest.pop("hashed")
    manifest.pop("query_tower")
    manifest["files"]["query_tower.pt"] = manifest["files"].pop("query_tower.pt2")
    (export / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("verb", ["recommend", "serve"])
def test_recommend_and_serve_refuse_a_format_4_export_in_one_line(copy, cli, pipeline, verb):
    """Format 5 serves query_tower.pt2: an export of format 4 (TorchScript) is read by exporting
    it again from its checkpoint, and the one line says so."""
    assert FORMAT_VERSION == 5
    _as_format_4(copy)
    args = ("--user", str(np.load(copy / "users.npz")["raw_user_ids"][0])) if verb == "recommend" else ("--port", "0")
    result = cli(verb, "--export", copy, *args, cwd=pipeline.root, timeout=120)
    assert result.returncode == 2, result.describe()
    assert result.stderr.strip() == (f"error: {copy / 'manifest.json'}: format version 4, this package reads 5: this "
                                     "export was written by an older version; run `twotower-rec export` again from "
                                     "the checkpoint"), result.describe()
    assert result.stdout == ""


def _rewrite_archive(path, replace: dict) -> None:
    """Rewrite the zip at ``path`` with the entries of ``replace`` (inner name -> bytes) swapped in."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    for name, data in replace.items():
        entries[next(n for n in entries if n.endswith(name))] = data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("where", ["weights", "sample_inputs"])
def test_loading_refuses_a_query_tower_archive_with_a_pickle_without_running_it(copy, tmp_path, where):
    """torch.export.load unpickles a weight marked use_pickle, and falls back to an unsafe torch.load
    for sample inputs the safe one refuses: such an archive is refused before torch reads it."""
    import io
    import pickle
    import zipfile

    import torch

    marker = tmp_path / "pickle-ran"
    path = copy / "query_tower.pt2"
    if where == "weights":
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data/weights/model_weights_config.json"))
            config = json.loads(archive.read(name))
        first = next(iter(config["config"]))
        config["config"][first]["use_pickle"] = True
        planted = {"data/weights/model_weights_config.json": json.dumps(config).encode(),
                   f"data/weights/{config['config'][first]['path_name']}": pickle.dumps(_Planted(str(marker)))}
    else:
        buffer = io.BytesIO()
        torch.save(_Planted(str(marker)), buffer)
        planted = {"data/sample_inputs/model.pt": buffer.getvalue()}
    _rewrite_archive(path, planted)
    _fix_checksum(copy, "query_tower.pt2")
    with pytest.raises(ExportError, match="query_tower.pt2: .*which torch.export.load would unpickle") as caught:
        ExportedModel.load(copy)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_ids_are_stored_as_plain_arrays():
    """Integer ids as int64, text ids as fixed-width unicode: neither needs a pickle."""
    from twotower_rec.export.writer import id_array

    assert id_array(np.array([3, 1, 2])).dtype == np.int64
    text = id_array(np.array(["u7", "7", "abc"], dtype=object))
    assert text.dtype.kind == "U" and text.tolist() == ["u7", "7", "abc"]
    huge = id_array(np.array([2**70, 5], dtype=object))  # integers past int64 are text ids
    assert huge.dtype.kind == "U" and huge.tolist() == [str(2**70), "5"]
    assert id_array(np.array([], dtype=object)).dtype.kind in "iU"


def test_the_export_holds_no_object_arrays(pipeline):
    assert np.load(pipeline.export_dir / "item_ids.npy", allow_pickle=False).dtype == np.int64
    with np.load(pipeline.export_dir / "users.npz", allow_pickle=False) as users:
        assert all(users[name].dtype != object for name in users.files)


def test_serving_looks_ids_up_with_the_id_rule(pipeline):
    """``recommend --user 007`` is user 7; liked ``"0010"`` and ``" 10 "`` are item 10."""
    model = ExportedModel.load(pipeline.export_dir)
    user = str(model.users["raw_user_ids"][6])
    padded = "00" + user
    assert [r.item for r in model.recommend_user(padded, k=5)] == [r.item for r in model.recommend_user(user, k=5)]
    assert model.recommend_user(f" {user}.0 ", k=3) == model.recommend_user(user, k=3)
    item = str(model.item_ids[9])
    assert model.unknown_items([f"00{item}", f" {item} ", "no-such-item"]) == ["no-such-item"]
    plain = model.recommend_new_user(liked=[item], k=5)
    assert model.recommend_new_user(liked=[f"00{item}"], k=5) == plain
    assert item not in {r.item for r in plain}


# --- item 12: the evaluation an export records is its checkpoint's ------------------------------------


def _meta_digest(checkpoint) -> str:
    return hashlib.sha256((checkpoint / "meta.json").read_bytes()).hexdigest()


def test_evaluation_json_names_the_checkpoint_it_scored(pipeline):
    scored = pipeline.eval_results["checkpoint"]
    meta = json.loads((pipeline.out_dir / "checkpoint" / "meta.json").read_text())
    assert scored["step"] == meta["step"]
    assert scored["meta_sha256"] == _meta_digest(pipeline.out_dir / "checkpoint")


def test_export_copies_the_evaluation_of_its_own_checkpoint(pipeline, tmp_path):
    out = _export(pipeline, tmp_path / "export")
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["test"]["model"] == pipeline.eval_results["model"]


def test_export_skips_an_evaluation_of_another_checkpoint(pipeline, tmp_path, capsys):
    """``train.out_dir/eval_test.json`` written for another checkpoint (a later training run, or
    ``--checkpoint`` pointing elsewhere) is not copied into the manifest; the log line says so."""
    run = tmp_path / "other_run"
    run.mkdir()
    other = dict(pipeline.eval_results, checkpoint={"path": "elsewhere", "step": 1, "meta_sha256": "0" * 64})
    (run / "eval_test.json").write_text(json.dumps(other))
    out = _export(pipeline, tmp_path / "export", checkpoint=pipeline.out_dir / "checkpoint",
                  overrides=[f"train.out_dir={run}"])
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert "test" not in metrics
    err = capsys.readouterr().err
    assert "eval_test.json" in err and "another checkpoint" in err
    (run / "eval_test.json").write_text(json.dumps({k: v for k, v in other.items() if k != "checkpoint"}))
    out = _export(pipeline, tmp_path / "export", checkpoint=pipeline.out_dir / "checkpoint",
                  overrides=[f"train.out_dir={run}"])
    assert "test" not in json.loads((out / "manifest.json").read_text())["metrics"]  # it names no checkpoint
