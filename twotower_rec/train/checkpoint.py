"""Checkpoints: ``torch.distributed.checkpoint`` of the (sharded) model and optimizers, plus ``meta.json``.

A checkpoint directory holds DCP shards, ``meta.json`` (config, feature-spec and vocabulary
fingerprints, step, trainer state, package and library versions, the size and SHA-256 of every
other file) and, for a resumable checkpoint, one RNG file per rank. DCP stores every table by
its global offsets, so a checkpoint written by N processes loads into M (any sharding).

Loading refuses, with one line naming the folder or file: a meta.json that is not JSON or
lacks a key, a file missing, truncated or changed (``integrity.py``), data other than the
data trained on (other sizes or other ids), and an RNG file that is anything but tensors and
plain values (it is read with ``torch.load(weights_only=True)``: nothing in it is run; the
pickled RNG files of earlier versions are refused with the fix, re-train). A save that
cannot write (a full disk, a read-only folder) is a :class:`CheckpointError` naming the
folder on every rank, and the checkpoint it was replacing is kept.

Crash safety: every rank writes into one folder beside ``<dir>``; ``meta.json`` is written
last; rank 0 then swaps it in (``twotower_rec/atomic.py``). Killed at any moment (even
SIGKILL), :func:`resolve` finds a complete checkpoint: it finishes or rolls back a swap that
was interrupted between its two renames.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torchrec.distributed import DistributedModelParallel

from twotower_rec import atomic, versions
from twotower_rec.config import Config, from_dict, to_dict
from twotower_rec.data.prepared import PreparedData
from twotower_rec.distributed.env import DistEnv, broadcast_object, gather_objects, seed_rank_streams, world
from twotower_rec.errors import CheckpointError, ConfigError
from twotower_rec.model.factory import build_model
from twotower_rec.tasks import TASKS, make_task
from twotower_rec.train import integrity

META = "meta.json"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "step", "config", "feature_spec_fingerprint")
_REQUIRED_TO_RESUME = ("world_size", "trainer")


def rng_state() -> dict:
    """This process's torch, numpy, random and (when CUDA is in use) GPU generator states, as
    tensors and plain numbers only: what ``torch.load(weights_only=True)`` reads back."""
    import random

    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "cuda": cuda}


def set_rng_state(state: dict) -> None:
    """Restore the torch, numpy, random and (when CUDA is in use) this GPU's generators.

    Args:
        state: what :func:`rng_state` returned.
    """
    import random

    torch.set_rng_state(state["torch"])
    numpy, python = state["numpy"], state["python"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), int(numpy["pos"]),
                         int(numpy["has_gauss"]), float(numpy["cached_gaussian"])))
    random.setstate((int(python["version"]), tuple(int(w) for w in python["words"].tolist()), python["gauss"]))
    # This rank's own GPU only (saved by the rank that used it): a node with fewer GPUs, or a
    # resume onto another number of them, has no "every GPU" to restore.
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(cuda)


def read_rng(path: Path) -> dict:
    """An RNG file (``{"rng": rng_state(), "extra": ...}``), read with ``weights_only=True``:
    tensors and plain values only, nothing in the file is run.

    Args:
        path: ``<checkpoint>/rng/rank<r>.pt``.

    Raises:
        CheckpointError: for anything else, e.g. the pickled form earlier versions wrote.
    """
    try:
        saved = torch.load(path, weights_only=True)
        state = saved["rng"]
        if not (isinstance(state["numpy"], dict) and isinstance(state["python"], dict)):
            raise TypeError("an RNG state of an earlier version")
        return saved
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, TypeError, IndexError) as err:
        named = re.search(r"GLOBAL (\S+)", str(err))  # torch's "Unsupported global: GLOBAL <name> ..."
        why = f"it refers to {named.group(1)}" if named else type(err).__name__
        raise CheckpointError(f"{path}: not an RNG state this version of twotower_rec reads ({why}); nothing in it "
                              "was run. Earlier versions pickled it: re-train (train without --resume), or resume "
                              "with the version that wrote it") from None


def save(path: str | Path, model: torch.nn.Module, cfg: Config, data: PreparedData, step: int,
         metrics: dict | None = None, optimizer=None, trainer_state: dict | None = None,
         extra: dict | None = None) -> Path:
    """Collective: every rank calls it. With ``optimizer`` the checkpoint can be resumed from:
    it also holds the optimizer state, every rank's RNG state and ``trainer_state``.

    Args:
        path: the checkpoint folder; a checkpoint already there is replaced atomically.
        model: the (sharded) model whose weights to save.
        cfg: the run's config, saved in meta.json.
        data: the prepared data trained on, whose feature spec and vocabulary fingerprints meta.json records.
        step: the step the weights are of.
        metrics: recorded in meta.json (e.g. the validation that selected the weights).
        optimizer: the optimizer, whose state makes the checkpoint resumable; None: weights only.
        trainer_state: the trainer's position and history (``TrainerState`` as a dict), in meta.json.
        extra: this rank's part of the task's state (e.g. the loss's frequency estimator), saved beside its RNG
            state; only with ``optimizer``.

    Returns:
        ``path``.

    Raises:
        CheckpointError: on every rank, when a rank cannot write (e.g. a full disk); the checkpoint
            at ``path`` is then left as it was.
        KeyboardInterrupt: after the save, when a Ctrl-C came during it (``atomic.uninterrupted``).
    """
    with atomic.uninterrupted():  # a Ctrl-C during the save is raised once the checkpoint is whole
        return _save(Path(path), model, cfg, data, step, metrics, optimizer, trainer_state, extra)


def _save(path: Path, model: torch.nn.Module, cfg: Config, data: PreparedData, step: int, metrics: dict | None,
          optimizer, trainer_state: dict | None, extra: dict | None) -> Path:
    """:func:`save`'s body."""
    rank, world_size = world()
    tmp = _shared_folder(path, rank)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    try:
        dcp.save(state, checkpoint_id=str(tmp))
    except CheckpointException as err:  # every rank gets it, when any rank failed
        if _os_error(err) is None:
            raise
        _give_up(path, tmp, rank, _os_error(err))
    files = _write_own_files(path, tmp, rank, optimizer is not None, extra)
    error = None
    if rank == 0:
        atomic.fault("shards_written")
        meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size, "config": to_dict(cfg),
                "feature_spec_fingerprint": data.spec.fingerprint(),
                "vocabulary_fingerprint": integrity.vocabulary_fingerprint(data), "versions": versions(),
                "metrics": metrics or {}, "resumable": optimizer is not None, "trainer": trainer_state or {},
                "files": files}
        try:
            _write_json(tmp / META, meta)
            atomic.swap_in(tmp, path)
        except OSError as err:
            error = _cannot_write(path, err)
            shutil.rmtree(tmp, ignore_errors=True)
    error = broadcast_object(error)  # also the barrier: no rank returns before the swap
    if error:
        raise CheckpointError(error)
    return path


def _write_own_files(path: Path, tmp: Path, rank: int, resumable: bool, extra: dict | None) -> dict:
    """This rank's RNG file (resumable checkpoints), then the size and SHA-256 of each file it
    wrote; every rank's entries, merged (a collective; a rank that could not write stops all)."""
    entries, error = {}, None
    try:
        if resumable:
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save({"rng": rng_state(), "extra": extra or {}}, tmp / "rng" / f"rank{rank}.pt")
        entries = integrity.hash_own_files(tmp)
    except OSError as err:
        error = _cannot_write(path, err)
    gathered = gather_objects((entries, error))
    errors = [e for _, e in gathered if e]
    if errors:
        _give_up(path, tmp, rank, errors[0])
    return integrity.complete_record(tmp, [e for e, _ in gathered]) if rank == 0 else {}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2))


def _os_error(err: CheckpointException) -> OSError | None:
    """The first OSError among the ranks' failures of a DCP save, if any."""
    for failure, _ in err.failures.values():
        if isinstance(failure, OSError):
            return failure
    return None


def _cannot_write(path: Path, err: OSError) -> str:
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return (f"cannot save the checkpoint {path}: {err.strerror or err}{where}; any previous checkpoint there is "
            "kept. Free space on that disk or make the folder writable, then `twotower-rec train --resume`")


def _give_up(path: Path, tmp: Path, rank: int, error: OSError | str) -> None:
    """Raise the save's error on this rank, rank 0 deleting the half-written folder first."""
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(_cannot_write(path, error) if isinstance(error, OSError) else error)


def _shared_folder(path: Path, rank: int) -> Path:
    """The folder every rank writes the new checkpoint into: rank 0 makes it, all learn its name."""
    name, error = "", None
    if rank == 0:
        try:
            name = str(atomic.new_folder(path))
        except OSError as err:
            error = _cannot_write(path, err)
    name, error = broadcast_object((name, error))
    if error:
        raise CheckpointError(error)
    return Path(name)


def resolve(path: str | Path) -> Path:
    """The complete checkpoint at ``path``, after finishing or rolling back a save killed
    between its two renames; ``path.old`` for such a save by an earlier version.

    Args:
        path: the checkpoint folder (it may hold no checkpoint: then ``path`` is returned as it is).
    """
    path = Path(path)
    atomic.recover(path)
    if (path / META).is_file():
        return path
    legacy = path.with_name(f"{path.name}.old")
    if (legacy / META).is_file():
        return legacy
    return path


def read_meta(path: str | Path) -> dict:
    """meta.json of the (complete) checkpoint at ``path``.

    Args:
        path: the checkpoint folder (:func:`resolve` finds the complete one).
    """
    return _meta_at(resolve(path))


def _meta_at(path: Path) -> dict:
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (missing {META}): run `twotower-rec train` first")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err}): the checkpoint is damaged; re-train, or use an "
                              f"intact copy of {path}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not a JSON object: the checkpoint is damaged; re-train")
    if "format_version" in meta and meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    _require(meta_path, meta, _REQUIRED)
    return meta


def _require(meta_path: Path, meta: dict, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: missing {', '.join(repr(k) for k in missing)}: the checkpoint is damaged "
                              "or was not written by twotower-rec; re-train")


def config_of(path: str | Path) -> Config:
    """The config a checkpoint was trained with (so evaluation rebuilds the same model).

    Args:
        path: the checkpoint folder.
    """
    try:
        return from_dict(read_meta(path)["config"])
    except (ConfigError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{Path(path) / META}: its config does not fit this version of twotower_rec "
                              f"({err}); re-train") from None


def fits(meta: dict, data: PreparedData) -> bool:
    """Whether a checkpoint (its meta.json) was trained on ``data``: the same feature spec and,
    where the checkpoint records them (this version on), the same raw ids.

    Args:
        meta: the checkpoint's meta.json.
        data: the prepared data.
    """
    return _misfit(meta, data) is None


def _misfit(meta: dict, data: PreparedData) -> str | None:
    """How ``data`` differs from the data the checkpoint was trained on, or None."""
    spec = data.spec
    if meta["feature_spec_fingerprint"] != spec.fingerprint():
        return f"feature spec {meta['feature_spec_fingerprint']}, data has {spec.fingerprint()}"
    saved = meta.get("vocabulary_fingerprint")
    if saved is not None and saved != integrity.vocabulary_fingerprint(data):
        return (f"the same counts and sizes, but other user or item ids: vocabulary {saved}, data at {data.dir} has "
                f"{integrity.vocabulary_fingerprint(data)}")
    return None


def _check_data(path: Path, meta: dict, data: PreparedData) -> None:
    misfit = _misfit(meta, data)
    if misfit:
        raise CheckpointError(f"{path} was trained on different prepared data ({misfit}): re-run train, or point "
                              "data.cache_dir at the data it was trained on")


def load(path: str | Path, model: torch.nn.Module, data: PreparedData) -> dict:
    """Load model weights into the (sharded) ``model`` in place; returns meta.json (with
    ``path``, the checkpoint folder read). Without a process group (an unsharded model in one
    process) the checkpoint is read by this process alone, whatever world size wrote it.

    Args:
        path: the checkpoint folder.
        model: the model to load into, built from the checkpoint's config: sharded, or plain.
        data: the prepared data; it must be the data the checkpoint was trained on.
    """
    return _load(path, model, data)


def load_for_resume(path: str | Path, model: torch.nn.Module, optimizer, data: PreparedData, cfg: Config) -> dict:
    """Model, optimizer state and this rank's RNG state from a resumable checkpoint, written at
    any world size, after checking ``cfg`` may continue it (:func:`check_resumable`). Returns
    meta.json (its ``trainer`` entry holds the step and data position; ``extra``, the task's saved state).

    Args:
        path: the resumable checkpoint folder (e.g. ``<out_dir>/last``).
        model: the model to load into.
        optimizer: the optimizer to load into, its state already initialised.
        data: the prepared data; it must be the data the checkpoint was trained on.
        cfg: the config of the run that continues.
    """
    meta = _load(path, model, data, optimizer, cfg)
    # The same world size continues each rank's random stream; another gets rank 0's.
    rank, world_size = world()
    rng = Path(meta["path"]) / "rng" / f"rank{rank}.pt"
    own = meta.get("world_size") == world_size and rng.is_file()
    if not own:
        rng = Path(meta["path"]) / "rng" / "rank0.pt"
    saved, error = None, None
    try:
        saved = read_rng(rng)
    except CheckpointError as err:
        error = str(err)
    errors = [e for e in gather_objects(error) if e]  # a rank that cannot read its file stops all
    if errors:
        raise CheckpointError(errors[0])
    set_rng_state(saved["rng"])
    if not own:  # rank 0's stream, continued by every rank: fork it, as at the start of a run
        seed_rank_streams(cfg.train.seed + meta["step"], rank)
    meta["extra"] = saved.get("extra", {})
    return meta


def _load(path: str | Path, model: torch.nn.Module, data: PreparedData, optimizer=None,
          cfg: Config | None = None) -> dict:
    """Weights (and with ``optimizer`` its state) from the checkpoint at ``path``, in place,
    after checking its meta.json, its data and its files."""
    path = resolve(path)
    meta = _meta_at(path)
    _check_data(path, meta, data)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        if not meta.get("resumable"):
            raise CheckpointError(f"{path} holds weights only (no optimizer state): resume from <out_dir>/last")
        _require(path / META, meta, _REQUIRED_TO_RESUME)
        check_resumable(meta["config"], cfg)
        state["optim"] = optimizer.state_dict()
    integrity.verify(path, meta)
    read_shards(state, path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    meta["path"] = str(path)
    return meta


def verify(path: str | Path) -> dict:
    """meta.json of the checkpoint at ``path``, after checking every file it records (a
    collective under a process group: see :func:`twotower_rec.train.integrity.verify`).

    Args:
        path: the checkpoint folder.
    """
    path = resolve(path)
    meta = _meta_at(path)
    integrity.verify(path, meta)
    return meta


def read_shards(state: dict, path: Path) -> None:
    """DCP's load of ``state`` (in place) from the checkpoint folder ``path``, its failure as one line.

    Args:
        state: the state dict to fill (e.g. ``{"model": model.state_dict()}``).
        path: the (verified) checkpoint folder.
    """
    if (path / ".metadata").is_file():  # refused here in one line, rather than inside DCP's load
        integrity.read_metadata(path / ".metadata")
    try:
        dcp.load(state, storage_reader=integrity.SafeReader(str(path)), no_dist=not dist.is_initialized())
    except CheckpointException as err:
        lines = [line for failure, _ in err.failures.values() for line in str(failure).strip().splitlines()]
        raise CheckpointError(f"{path}: its shards cannot be read ({(lines or ['?'])[0][:300]}): the checkpoint is "
                              "damaged or of another model; re-train, or use an intact copy") from None


class Trained(NamedTuple):
    """A checkpoint loaded for evaluation or export."""

    model: DistributedModelParallel
    data: PreparedData
    meta: dict
    cfg: Config  # the config it was trained with (data.cache_dir: the data it is used with now)


def load_trained(path: str | Path, cache_dir: str | Path, env: DistEnv) -> Trained:
    """The checkpoint at ``path`` rebuilt from its own model config, on the prepared data at
    ``cache_dir`` (which must be the data it was trained on), sharded, in eval mode.

    Args:
        path: the checkpoint folder.
        cache_dir: the prepared data's folder.
        env: the process group.
    """
    trained_cfg = config_of(path)
    trained_cfg.data.cache_dir = str(cache_dir)
    data = PreparedData(cache_dir)
    model = build_model(trained_cfg, make_task(trained_cfg), data, env, training=False)
    meta = load(path, model, data)
    model.eval()
    return Trained(model, data, meta, trained_cfg)


# Config sections that must not change between a run and its resumption.
# (and every task's own section: check_resumable adds them)
_RESUME_FIXED = ("task", "features", "model", "loss", "train.batch_size", "train.seed", "train.sparse_optimizer",
                 "train.dense_lr", "train.sparse_lr", "train.weight_decay", "train.table_weight_decay",
                 "train.warmup_steps", "train.lr_schedule", "data.cache_dir")


def check_resumable(saved: dict, cfg: Config) -> None:
    """Refuse to resume under a config that changed what the saved run trains.

    Args:
        saved: the checkpoint's config as a dict (meta.json's ``config``).
        cfg: the config of the run that continues.

    Raises:
        CheckpointError: naming the first option that differs.
    """
    current = to_dict(cfg)
    for key in _RESUME_FIXED + tuple(t.section for t in TASKS.values() if t.section):
        a, b = saved, current
        for part in key.split("."):
            a, b = a.get(part), b.get(part)
        if isinstance(a, dict) and isinstance(b, dict) and a != b:  # name the option, not the section
            key, a, b = next((f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                             if a.get(k) != b.get(k))
        if a != b:
            raise CheckpointError(
                f"--resume: {key} was {a} in the checkpoint and is {b} now; resume with the same value "
                f"(epochs, max_steps, validation and checkpoint settings may change)")
