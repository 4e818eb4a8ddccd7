"""The training modes as tasks (``twotower_rec/tasks/``): the registry the config reads, and
``task: bpr``, the task that was added as one file (a hand computation of its loss, and its
training through the real CLI at one and two processes)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import tiny_config, training_losses

from twotower_rec.config import Config, load_config
from twotower_rec.tasks import TASKS, make_task
from twotower_rec.tasks.bpr import bpr_loss


def test_every_task_file_registers_its_task_and_its_section():
    assert set(TASKS) == {"retrieval", "pointwise", "next_item", "bpr"}
    sections = {t.section for t in TASKS.values() if t.Options is not None}
    assert sections == {"retrieval", "pointwise", "next_item"} and sections <= set(vars(Config()))
    for name in TASKS:
        overrides = [f"task={name}"] + (["model.history_encoder=causal"] if name == "next_item" else [])
        assert make_task(load_config(None, overrides)).name == name


@pytest.mark.parametrize("masking", [True, False])
def test_bpr_loss_by_hand(masking):
    torch.manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    item = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)  # 3 positives, 2 uniform
    ids = torch.tensor([7, 8, 7, 9, 8])  # row 2's positive repeats row 0's; uniform 8 is row 1's
    got = bpr_loss(query, item, ids, 0.5, global_negatives=True, mask_accidental_hits=masking)
    expected = 0.0
    for b in range(3):
        pairs = []
        for j in range(5):
            if j == b or (masking and int(ids[j]) == int(ids[b])):
                continue
            margin = (float(query[b] @ item[b]) - float(query[b] @ item[j])) / 0.5
            pairs.append(-math.log(1 / (1 + math.exp(-margin))))
        expected += sum(pairs) / len(pairs)
    assert float(got) == pytest.approx(expected / 3, rel=1e-9)


def test_bpr_trains_the_same_at_one_and_two_processes_and_beats_popularity(tmp_path, cli):
    cfg = tiny_config(tmp_path)
    cfg["task"] = "bpr"
    cfg["loss"].update({"uniform_negatives": 16})
    cfg["train"].update({"epochs": 2})
    path = tmp_path / "bpr.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = cli("prepare", "--config", path, cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    losses = training_losses(tmp_path, path, [("one", 1, []), ("two", 2, [])])
    assert losses["one"] == pytest.approx(losses["two"], abs=1e-5)
    assert losses["one"][-1] < 0.8 * losses["one"][0]
    result = cli("evaluate", "--config", path, "--set", f"train.out_dir={tmp_path / 'one'}", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    metrics = json.loads((tmp_path / "one" / "eval_test.json").read_text())
    assert metrics["model"]["recall@10"] > 1.5 * metrics["popularity"]["recall@10"]
