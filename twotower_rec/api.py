"""The Python API: one function per verb, each with a typed result. The CLI (``cli.py``) parses
its arguments, calls these and prints; a notebook calls them directly::

    from twotower_rec import evaluate, export, load_config, load_export, prepare, train

    cfg = load_config("configs/tiny.yaml", ["run_dir=runs/tiny"])
    prepare(cfg)                        # the columnar cache in data.cache_dir
    train(cfg)                          # TrainResult: steps, losses, validation, checkpoint
    result = evaluate(cfg)              # EvalResult: result.metrics["model"]["ndcg@10"]
    model = load_export(export(cfg))    # the serving object
    model.recommend_user("1", k=10)

Every function takes a :class:`~twotower_rec.config.Config` (or the path of a YAML file). The
ones that train or load a checkpoint join the process group (a world of one without
``torchrun``) and leave it when done; under ``torchrun`` every rank calls them, rank 0 writes.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twotower_rec.config import Config, load_config, to_dict
from twotower_rec.errors import ConfigError, ConfigWarning

if TYPE_CHECKING:
    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.serving.exported import ExportedModel
    from twotower_rec.train.trainer import TrainResult


def _config(cfg: Config | str | Path) -> Config:
    return cfg if isinstance(cfg, Config) else load_config(cfg)


def prepare(cfg: Config | str | Path) -> PreparedData:
    """Read the source ``data.source`` names, split it, build vocabularies on training rows and
    write the columnar cache to ``data.cache_dir`` (replaced whole).

    Args:
        cfg: the config (its ``data`` and ``features`` sections).

    Returns:
        The prepared data, memory-mapped (``.summary()`` counts rows, users, items, splits).
    """
    from twotower_rec.data.prepared import prepare as prepare_cache
    from twotower_rec.data.sources import load_raw

    cfg = _config(cfg)
    return prepare_cache(load_raw(cfg.data), cfg.data, cfg.features)


def train(cfg: Config | str | Path, resume: bool | str | Path = False) -> TrainResult:
    """Train on the prepared cache; write ``train.out_dir``'s ``checkpoint`` (best on
    validation), ``last`` (resumable) and ``train_metrics.json``. The run holds ``train.out_dir``
    (an exclusive lock): a second ``train`` on it is refused while this one runs.

    Args:
        cfg: the config.
        resume: False trains from scratch; True continues from ``<train.out_dir>/last``; a path
            continues from that checkpoint. An ensemble (``model.members`` > 1) resumes from its
            members' folders only (True).

    Returns:
        Steps, per-step losses, the validation history, the best checkpoint's path, examples/s.
    """
    from twotower_rec.distributed.env import init_distributed, shutdown
    from twotower_rec.train.ensemble import train_ensemble
    from twotower_rec.train.lock import out_dir_lock
    from twotower_rec.train.trainer import train as train_one

    cfg = _config(cfg)
    if cfg.model.members > 1 and resume not in (False, True):
        raise ConfigError(f"--resume {resume}: an ensemble (model.members={cfg.model.members}) resumes from its "
                          f"members' folders under {cfg.train.out_dir}; give --resume without a path")
    env = init_distributed(cfg.distributed.timeout_minutes)
    try:
        with out_dir_lock(cfg.train.out_dir):  # one run at a time writes a folder
            if cfg.model.members > 1:
                return train_ensemble(cfg, env, resume=bool(resume))
            start = None if resume is False else Path(cfg.train.out_dir) / "last" if resume is True else Path(resume)
            return train_one(cfg, env, resume=start)
    finally:
        shutdown()


@dataclass
class EvalResult:
    """What ``evaluate`` measured on one split.

    Attributes:
        split: ``test`` or ``validation``.
        events, users: how many events were ranked, of how many distinct users.
        num_items: the catalog's size (every item is ranked).
        filter_seen: whether items met before each event were removed from its list.
        ks: the cut-offs.
        metrics: by ranker (``model``, ``popularity``, and with baselines ``item_knn``, ``ease``,
            ``transition``): Recall/HR/NDCG at each k, MRR, events and users.
        pairs: the task's pair metrics (e.g. AUROC for task=pointwise), or None.
        pairs_line: their one-line summary, or None.
        path: the JSON file the metrics were written to.
        topk_path: the ranked lists' file (``save_topk``), or None.
    """

    split: str
    events: int
    users: int
    num_items: int
    filter_seen: bool
    ks: list[int]
    metrics: dict[str, dict[str, float]]
    pairs: dict[str, float] | None
    pairs_line: str | None
    path: Path
    topk_path: Path | None = None

    def report(self) -> str:
        """The lines ``twotower-rec evaluate`` prints: the split, the table, the task's pair
        metrics and Recall@50 against most-popular."""
        from twotower_rec.evaluation.metrics import format_table

        who = f"{self.users} users" if self.events == self.users else f"{self.events} events of {self.users} users"
        seen = "seen items filtered" if self.filter_seen else "seen items kept"
        lines = [f"{self.split} split, {who}, full catalog of {self.num_items} items, {seen}",
                 format_table(self.metrics, self.ks)]
        if self.pairs_line:
            lines.append(self.pairs_line)
        if 50 in self.ks:
            model_r, pop_r = self.metrics["model"]["recall@50"], self.metrics["popularity"]["recall@50"]
            ratio = model_r / pop_r if pop_r > 0 else float("inf")
            lines.append(f"Recall@50: model {model_r:.4f} vs most-popular {pop_r:.4f} ({ratio:.1f}x)")
        return "\n".join(lines)


def _checkpoint(cfg: Config, checkpoint: str | Path | None) -> Path:
    return Path(checkpoint) if checkpoint else Path(cfg.train.out_dir) / "checkpoint"


def checkpoint_overrides(cfg: Config, trained: Config) -> list[str]:
    """One line per option of the model and the task (``task``, ``model``, ``loss`` and the task
    sections) where ``cfg`` differs from the config the checkpoint was trained with: ``evaluate``
    and ``export`` rebuild the model from the checkpoint's, so those values are ignored.

    Args:
        cfg: the config ``evaluate`` or ``export`` was given.
        trained: the config saved in the checkpoint.
    """
    from twotower_rec.tasks import TASKS

    sections = ["task", "model", "loss"] + [t.section for t in TASKS.values() if t.section]
    mine, theirs = to_dict(cfg), to_dict(trained)
    lines = []
    for section in sections:
        a, b = mine[section], theirs[section]
        pairs = [(section, a, b)] if not isinstance(a, dict) else [(f"{section}.{k}", a[k], b.get(k)) for k in a]
        lines += [f"{key}={here!r} is ignored: the checkpoint was trained with {key}={there!r}, and its config is used"
                  for key, here, there in pairs if here != there]
    return lines


def _load(cfg: Config, checkpoint: str | Path | None, env):
    """The checkpoint, loaded and sharded, after the prepared-data and override checks."""
    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.train.checkpoint import config_of, load_trained

    path = _checkpoint(cfg, checkpoint)
    config_of(path)  # a missing or unreadable checkpoint is the first thing to say
    PreparedData(cfg.data.cache_dir).check_config(cfg)
    trained = load_trained(path, cfg.data.cache_dir, env)
    if env.is_main:
        for line in checkpoint_overrides(cfg, trained.cfg):
            warnings.warn(line, ConfigWarning, stacklevel=3)
    return trained


def evaluate(cfg: Config | str | Path, checkpoint: str | Path | None = None, baselines: bool = False,
             save_topk: str | Path | None = None, output: str | Path | None = None) -> EvalResult | None:
    """Rank the whole catalog for every event of ``eval.split`` with the checkpoint's model (and
    most-popular), write the metrics as JSON.

    Args:
        cfg: the config (``eval`` section; the model comes from the checkpoint's own config).
        checkpoint: the checkpoint folder (default ``<train.out_dir>/checkpoint``).
        baselines: also rank with item-kNN, EASE and the last-items transition model.
        save_topk: also write each event's top ``max(eval.ks)`` raw item ids (``.npz`` or ``.parquet``).
        output: the metrics JSON (default ``<train.out_dir>/eval_<split>.json``); its ``checkpoint`` entry names
            the checkpoint scored (folder, step, SHA-256 of its meta.json), which ``export`` checks.

    Returns:
        The result on rank 0 (None on the other ranks of a multi-process run).
    """
    from twotower_rec.data.batches import Batcher
    from twotower_rec.data.splits import SPLIT_NAMES
    from twotower_rec.distributed.env import init_distributed, shutdown
    from twotower_rec.distributed.threads import apply_thread_count
    from twotower_rec.evaluation.ranking import rank_split, save_topk as write_topk, split_metrics
    from twotower_rec.model.factory import towers
    from twotower_rec.tasks import make_task

    cfg = _config(cfg)
    env = init_distributed(cfg.distributed.timeout_minutes)
    apply_thread_count(cfg.train.num_threads, env.local_world_size, prefetching=False)
    try:
        trained = _load(cfg, checkpoint, env)
        task = make_task(trained.cfg)
        encode_query, encode_items = towers(trained.model)
        batcher = Batcher(trained.data)
        ranking = rank_split(encode_query, encode_items, trained.data, batcher, cfg.eval,
                             SPLIT_NAMES[cfg.eval.split], seed=cfg.train.seed, device=env.device)
        pairs = task.pair_metrics(trained.model, trained.data, batcher, ranking.rows, device=env.device)
    finally:
        shutdown()
    if not env.is_main:
        return None
    data = trained.data
    if baselines:
        from twotower_rec.evaluation.baselines import NAMES, rank_baseline

        for name in NAMES:  # most-popular is always there
            ranking.top[name] = rank_baseline(name, data, ranking.rows, cfg.eval, max(cfg.eval.ks))
    results = split_metrics(ranking, cfg.eval.ks)
    written: dict = dict(results)
    if pairs is not None:
        written[task.name] = pairs
    written["checkpoint"] = _scored_checkpoint(_checkpoint(cfg, checkpoint))
    out = Path(output) if output else Path(cfg.train.out_dir) / f"eval_{cfg.eval.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(written, indent=2))
    topk = write_topk(ranking, data, save_topk) if save_topk else None
    return EvalResult(split=cfg.eval.split, events=int(results["model"]["events"]),
                      users=int(results["model"]["users"]), num_items=data.spec.num_items,
                      filter_seen=cfg.eval.filter_seen, ks=list(cfg.eval.ks), metrics=results, pairs=pairs,
                      pairs_line=task.describe_pairs(pairs) if pairs is not None else None, path=out, topk_path=topk)


def _scored_checkpoint(path: str | Path) -> dict:
    """What names a checkpoint in an evaluation's JSON: its folder, step and the SHA-256 of its
    meta.json (written anew by every save, so two saves never share it).

    Args:
        path: the checkpoint folder.
    """
    import hashlib

    from twotower_rec.train import checkpoint as checkpoints

    folder = checkpoints.resolve(path)
    meta = folder / checkpoints.META
    return {"path": str(folder), "step": json.loads(meta.read_text()).get("step"),
            "meta_sha256": hashlib.sha256(meta.read_bytes()).hexdigest()}


def _evaluation_of(cfg: Config, path: Path) -> tuple[dict | None, str]:
    """``train.out_dir/eval_<split>.json`` when it scored the checkpoint at ``path`` (else None),
    and a note for the export's log line when it is left out."""
    evaluated = Path(cfg.train.out_dir) / f"eval_{cfg.eval.split}.json"
    if not evaluated.is_file():
        return None, ""
    try:
        metrics = json.loads(evaluated.read_text())
    except ValueError:
        return None, f"{evaluated} left out: not valid JSON"
    scored = metrics.get("checkpoint") if isinstance(metrics, dict) else None
    if not isinstance(scored, dict) or "meta_sha256" not in scored:
        return None, f"{evaluated} left out: it does not name the checkpoint it scored (run evaluate again)"
    if scored["meta_sha256"] != _scored_checkpoint(path)["meta_sha256"]:
        return None, (f"{evaluated} left out: it scored another checkpoint ({scored.get('path')}, step "
                      f"{scored.get('step')}); run evaluate on this one")
    return metrics, ""


def export(cfg: Config | str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write what serving needs from a checkpoint into ``export.dir`` (replaced whole; a folder
    that is not an export is refused): item embeddings and raw ids, the ANN index with its
    measured recall, the query tower, users, vocabularies and the manifest
    (``twotower_rec/export/__init__.py`` lists every file). The manifest's metrics take
    ``train.out_dir/eval_<split>.json`` only when that evaluation scored this checkpoint.

    Args:
        cfg: the config (``export`` section; the model comes from the checkpoint's own config).
        checkpoint: the checkpoint folder (default ``<train.out_dir>/checkpoint``).
        out: the export folder (default ``export.dir``).

    Returns:
        The export folder (rank 0 writes it; under torchrun the other ranks return at once).
    """
    import os

    import torch

    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.export.writer import check_target, write_export
    from twotower_rec.model.factory import new_model
    from twotower_rec.tasks import make_task
    from twotower_rec.train import checkpoint as checkpoints

    from twotower_rec.config import check_run_folders

    cfg = _config(cfg)
    target = Path(out or cfg.export.dir)
    check_run_folders(cfg, target)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reads the checkpoint on its own
        return target
    path = _checkpoint(cfg, checkpoint)
    trained_cfg = checkpoints.config_of(path)  # a missing or unreadable checkpoint is the first thing to say
    check_target(target)  # before the model is read: refusing a folder that is not an export is quick
    data = PreparedData(cfg.data.cache_dir)
    data.check_config(cfg)
    for line in checkpoint_overrides(cfg, trained_cfg):
        warnings.warn(line, ConfigWarning, stacklevel=2)
    # The plain CPU model, its tables read from the (sharded) checkpoint's files in place: each
    # table is held once, whatever world size wrote it (no gather, no copy per rank).
    plain = new_model(trained_cfg.model, data.spec, make_task(trained_cfg), torch.device("cpu"))
    meta = checkpoints.load(path, plain, data)
    metrics = dict(meta.get("metrics") or {})
    evaluation, note = _evaluation_of(cfg, path)
    if evaluation is not None:
        metrics[cfg.eval.split] = evaluation
    trained_cfg.data.cache_dir = cfg.data.cache_dir
    write_export(plain, data, to_dict(trained_cfg), target, cfg.export, metrics=metrics, note=note)
    return target


def load_export(path: str | Path) -> ExportedModel:
    """The serving object of an export folder, after checking it against its manifest (needs
    only torch, numpy, pandas and faiss: no TorchRec).

    Args:
        path: the folder ``export`` wrote.

    Returns:
        An :class:`~twotower_rec.serving.exported.ExportedModel`: ``recommend_user``,
        ``recommend_new_user``, ``recommend_users``.
    """
    from twotower_rec.serving.exported import ExportedModel

    return ExportedModel.load(path)
