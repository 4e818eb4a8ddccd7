"""The Python API (``twotower_rec.api``, re-exported by the package): the main job through
importable functions alone, as a notebook runs it, and what the config tells a user it does
(run_dir, options fixed by prepare, a checkpoint's own model config, renamed options)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_config

from twotower_rec.config import load_config
from twotower_rec.errors import ConfigError, ConfigWarning


def test_the_python_api_runs_prepare_train_evaluate_export_recommend(tmp_path):
    """configs/tiny.yaml through ``from twotower_rec import ...`` alone, in a fresh interpreter
    (what a notebook has): every verb's typed result, and the files the CLI would write."""
    script = f"""
import json
import re
from pathlib import Path
from twotower_rec import evaluate, export, load_config, load_export, prepare, train

cfg = load_config({str(REPO / 'configs' / 'tiny.yaml')!r}, ["run_dir={tmp_path / 'run'}", "train.progress=false"])
data = prepare(cfg)
result = train(cfg)
evaluation = evaluate(cfg)
folder = export(cfg)
model = load_export(folder)
recs = model.recommend_user(str(data.raw_user_ids[0]), k=5)
print(json.dumps({{"summary": data.summary(), "steps": result.steps, "losses": len(result.losses),
                  "checkpoint": str(result.checkpoint), "metrics": evaluation.metrics, "written": str(evaluation.path),
                  "report": evaluation.report(), "export": str(folder), "recs": [r.item for r in recs]}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run = tmp_path / "run"
    assert out["summary"]["rows"] > 0 and (run / "data" / "feature_spec.json").is_file()
    assert out["steps"] > 0 and out["losses"] == out["steps"]
    assert out["checkpoint"] == str(run / "train" / "checkpoint")
    model, popularity = out["metrics"]["model"], out["metrics"]["popularity"]
    assert model["recall@50"] > popularity["recall@50"]
    assert json.loads(Path(out["written"]).read_text())["model"] == model
    assert "test split" in out["report"] and "Recall@50: model" in out["report"]
    assert out["export"] == str(run / "export") and (run / "export" / "manifest.json").is_file()
    assert len(out["recs"]) == 5 and len(set(out["recs"])) == 5


def test_importing_the_package_imports_no_torch():
    """The API's names are imported on first use: ``import twotower_rec`` (what the serving
    code and ``--help`` run first) loads neither torch nor TorchRec."""
    proc = subprocess.run([sys.executable, "-c", "import sys, twotower_rec; print('torch' in sys.modules, "
                                                 "callable(twotower_rec.prepare))"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.stdout.split() == ["False", "True"], proc.stderr


def test_run_dir_places_the_cache_the_run_and_the_export_unless_they_are_set():
    cfg = load_config(None, ["run_dir=runs/x"])
    assert (cfg.data.cache_dir, cfg.train.out_dir, cfg.export.dir) == ("runs/x/data", "runs/x/train", "runs/x/export")
    cfg = load_config(None, ["run_dir=runs/x", "train.out_dir=elsewhere"])
    assert (cfg.data.cache_dir, cfg.train.out_dir) == ("runs/x/data", "elsewhere")


@pytest.mark.parametrize("key, new", [("loss.name=bce", "task"), ("train.examples=sequences", "task"),
                                      ("loss.batch_negatives=8", "retrieval.batch_negatives"),
                                      ("model.user_encoder=causal", "model.history_encoder"),
                                      ("train.windows=last", "next_item.windows")])
def test_a_renamed_option_says_where_it_went(key, new):
    with pytest.raises(ConfigError, match=rf"'{key.split('=')[0]}': it was renamed; use {new}"):
        load_config(None, [key])


def test_an_option_nothing_reads_is_reported_and_a_read_one_is_not():
    with pytest.warns(ConfigWarning, match="pointwise.rating_threshold=3.0 is read by task=pointwise only"):
        load_config(None, ["pointwise.rating_threshold=3"])
    with pytest.warns(ConfigWarning, match="model.encoder_layers=3 configures the transformer and causal"):
        load_config(None, ["model.encoder_layers=3"])
    with pytest.warns(ConfigWarning, match=re.escape("loss.logq=none is read by task=next_item | retrieval only")):
        load_config(None, ["task=bpr", "loss.logq=none"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config(None, ["task=pointwise", "pointwise.rating_threshold=3", "model.history_encoder=transformer",
                           "model.encoder_layers=3"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny prepared and trained run, through the CLI."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("api-config")
    path = root / "tiny.yaml"
    cfg = tiny_config(root)
    cfg["train"]["epochs"] = 1
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for verb in ("prepare", "train"):
        result = run_cli(verb, "--config", path, cwd=root)
        assert result.returncode == 0, result.describe()
    return root, path


@pytest.mark.parametrize("verb", ["train", "evaluate", "export"])
def test_an_option_prepare_fixed_is_refused_when_it_differs(cli, trained, verb):
    root, path = trained
    result = cli(verb, "--config", path, "--set", "features.history_length=7", "--set",
                 f"train.out_dir={root / 'run'}" if verb != "train" else f"train.out_dir={root / 'other'}", cwd=root)
    assert result.returncode == 2, result.describe()
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: features.history_length=7 differs from the prepared data at ")
    assert str(root / "data") in line and "features.history_length=10" in line
    # a reading option (where the source is) is not fixed: the same run with another data_dir trains
    if verb == "train":
        ok = cli("train", "--config", path, "--set", "data.data_dir=/nowhere", "--set",
                 f"train.out_dir={root / 'other'}", cwd=root)
        assert ok.returncode == 0, ok.describe()


@pytest.mark.parametrize("verb", ["evaluate", "export"])
def test_model_options_on_a_checkpoint_are_reported_as_ignored(cli, trained, verb):
    root, path = trained
    result = cli(verb, "--config", path, "--set", "model.embedding_dim=32", cwd=root)
    assert result.returncode == 0, result.describe()
    assert ("warning: model.embedding_dim=32 is ignored: the checkpoint was trained with model.embedding_dim=16, "
            "and its config is used") in result.stderr
    if verb == "evaluate":
        assert json.loads((root / "run" / "eval_test.json").read_text())["model"]["events"] > 0
