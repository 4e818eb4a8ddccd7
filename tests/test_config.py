"""Config files, dotted overrides, validation and the error messages a user sees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from twotower_rec.config import Config, TrainConfig, derive_paths, from_dict, load_config, to_dict
from twotower_rec.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_config_files():
    names = {p.name for p in CONFIG_FILES}
    assert {"demo.yaml", "tiny.yaml"} <= names


def _leaves(data: dict, section, prefix: str = ""):
    """(dotted key, value) of each config value in ``data``; a mapping is a value when its
    field is one (``train.table_weight_decay``), else a section to walk into."""
    for key, value in data.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(section, key)):
            yield from _leaves(value, getattr(section, key), f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_loads_validates_and_holds_its_values(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw
    for dotted, value in _leaves(raw, cfg):
        assert _get(cfg, dotted) == value, dotted
    # What a checkpoint stores rebuilds the same config.
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_starts_with_a_comment_showing_how_to_run_it(path):
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{path.name}: first line is not a comment"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert "twotower-rec" in text
    assert f"--config configs/{path.name}" in text


def test_unknown_key_in_yaml_names_the_key_the_file_and_the_closest_valid_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_sise: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.batch_sise" in message
    assert "train.batch_size" in message
    assert str(path) in message


def test_unknown_top_level_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="trian") as info:
        load_config(path)
    assert "'train'" in str(info.value)


def test_unknown_override_key_names_the_key_and_the_closest_valid_name():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.embeding_dim=8"])
    message = str(info.value)
    assert "model.embeding_dim" in message
    assert "model.embedding_dim" in message


def test_bad_type_names_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.batch_size=abc"])
    assert "train.batch_size" in str(info.value)
    assert "abc" in str(info.value)


def test_bad_type_in_yaml_names_the_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  mlp_dims: 128\n")  # a list is expected
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "model.mlp_dims" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("override", ["train.progress=maybe", "train.batch_size=true", "train.dense_lr=fast"])
def test_other_bad_types_are_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("text, value", [("2e-3", 0.002), ("1E-4", 1e-4), ("5e+2", 500.0), ("3.5e-1", 0.35)])
def test_a_number_in_exponent_notation_is_a_number(tmp_path, text, value):
    """YAML 1.1 (PyYAML) reads 2e-3 (no dot) as a string; a learning rate written so must still
    be the number, on the command line and in a config file."""
    assert load_config(None, [f"train.dense_lr={text}"]).train.dense_lr == pytest.approx(value)
    path = tmp_path / "lr.yaml"
    path.write_text(f"train:\n  dense_lr: {text}\n")
    assert load_config(path).train.dense_lr == pytest.approx(value)


def test_bad_choice_suggests_the_valid_one():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.source=synthetc"])
    message = str(info.value)
    assert "data.source" in message
    assert "'synthetic'" in message


@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_batch_size_is_rejected(value):
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, [f"train.batch_size={value}"])


@pytest.mark.parametrize("override", ["train.epochs=0", "train.epochs=-1", "train.max_steps=-1"])
def test_values_that_leave_training_with_no_steps_are_rejected(override):
    """Zero epochs or a negative step cap run no step at all; `train` then crashes with a
    TypeError traceback while printing the final loss (None). Validation must catch them."""
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.batch_size"])


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    defaults = TrainConfig()
    yaml_batch, cli_batch, yaml_epochs = defaults.batch_size + 7, defaults.batch_size + 11, defaults.epochs + 4
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  batch_size: {yaml_batch}\n  epochs: {yaml_epochs}\n")

    from_yaml = load_config(path)
    assert from_yaml.train.batch_size == yaml_batch
    assert from_yaml.train.epochs == yaml_epochs

    cfg = load_config(path, [f"train.batch_size={cli_batch}", "model.mlp_dims=[256,128]"])
    assert cfg.train.batch_size == cli_batch  # CLI beats YAML
    assert cfg.train.epochs == yaml_epochs  # YAML beats defaults
    assert cfg.train.dense_lr == defaults.dense_lr  # untouched: the default
    assert cfg.model.mlp_dims == [256, 128]
    defaults_only = Config()
    derive_paths(defaults_only)
    assert load_config(None) == defaults_only  # no file, no overrides: the defaults (paths under run_dir)

    # The last of two overrides of one key wins.
    assert load_config(None, ["train.epochs=2", "train.epochs=5"]).train.epochs == 5


def test_overrides_do_not_leak_between_loads():
    load_config(None, ["model.mlp_dims=[8]"])
    assert load_config(None).model.mlp_dims == Config().model.mlp_dims


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  batch_size: [1, 2\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "YAML" in message


def test_missing_config_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(path)


def test_config_error_is_a_user_error():
    from twotower_rec.errors import TwoTowerError

    assert issubclass(ConfigError, TwoTowerError)


def test_mapping_values_are_checked_key_by_key():
    cfg = load_config(None, ["train.table_weight_decay={t_history: 0.5, t_item_id: 1}"])
    assert cfg.train.table_weight_decay == {"t_history": 0.5, "t_item_id": 1.0}
    with pytest.raises(ConfigError, match=r"train.table_weight_decay.t_history: expected a number"):
        load_config(None, ["train.table_weight_decay={t_history: lots}"])
    with pytest.raises(ConfigError, match="train.table_weight_decay: expected a mapping"):
        load_config(None, ["train.table_weight_decay=[0.1]"])
    with pytest.raises(ConfigError, match=r"train.table_weight_decay.t_history: must be >= 0"):
        load_config(None, ["train.table_weight_decay={t_history: -1}"])


@pytest.mark.parametrize("overrides, message", [
    (["model.members=0"], r"model\.members: must be at least 1"),
    (["model.members=3", "task=pointwise"], r"model\.members=3: ensembles are trained for task=retrieval only"),
])
def test_ensemble_sizes_and_objectives_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_prefetch_batches_is_null_by_default_and_never_negative():
    assert load_config(None, []).train.prefetch_batches is None
    assert load_config(None, ["train.prefetch_batches=3"]).train.prefetch_batches == 3
    with pytest.raises(ConfigError, match=r"train.prefetch_batches: must be >= 0"):
        load_config(None, ["train.prefetch_batches=-1"])


@pytest.mark.parametrize("overrides, names", [
    (["data.cache_dir=runs/x", "train.out_dir=runs/x"], ("data.cache_dir", "train.out_dir")),
    (["data.cache_dir=runs/x", "train.out_dir=runs/x/train"], ("data.cache_dir", "train.out_dir")),
    (["train.out_dir=runs/x", "data.cache_dir=runs/x/./data"], ("data.cache_dir", "train.out_dir")),
    (["train.out_dir=runs/x", "export.dir=runs/x"], ("train.out_dir", "export.dir")),
    (["data.cache_dir=runs/x/export/data", "export.dir=runs/x/export"], ("data.cache_dir", "export.dir")),
])
def test_overlapping_run_folders_are_refused(overrides, names):
    # `prepare` replaces data.cache_dir and `export` replaces export.dir whole: a checkpoint
    # folder inside either (or either inside it) would be deleted by the next run of that verb.
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert all(name in message for name in names) and "overlap" in message


def test_folders_beside_each_other_are_accepted():
    cfg = load_config(None, ["data.cache_dir=runs/x/data", "train.out_dir=runs/x/train", "export.dir=runs/x/data2"])
    assert cfg.export.dir == "runs/x/data2"


def test_export_out_may_not_overlap_the_run(tmp_path):
    from twotower_rec.api import export

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="overlap"):
        export(cfg, out=cfg.train.out_dir)
