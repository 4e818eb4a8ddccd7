"""Typed configuration: a dataclass tree, YAML files and dotted command-line overrides.

Precedence is CLI (``--set train.batch_size=2048``) > YAML > the defaults below.
Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key
and, for a misspelt key, the closest valid name.

Each option's help is the docstring on the line after its field (first sentence: the one-line
help); ``python -m twotower_rec.config_reference`` writes them to ``docs/configuration.md``
and refuses a field without one.

Example::

    cfg = load_config("configs/demo.yaml", overrides=["train.batch_size=512"])
    cfg.train.batch_size  # 512
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from twotower_rec.errors import ConfigError, ConfigWarning, check_choice, closest


@dataclass
class SyntheticConfig:
    """The built-in data set: users with latent tastes over item clusters."""

    num_users: int = 3000
    """Users generated."""
    num_items: int = 2000
    """Items in the generated catalog."""
    interactions_per_user: int = 40
    """The median number of events drawn per user (log-normal spread, at least 5); a repeated (user, item) pair
    keeps its first event only."""
    num_clusters: int = 20
    """Latent item clusters: each item belongs to one, and a user's events walk over the clusters they like."""
    num_genres: int = 18
    """Size of the genre vocabulary; an item's genres follow its cluster, with some noise."""
    clusters_per_user: int = 2
    """Clusters each user likes (with Dirichlet weights); at most data.synthetic.num_clusters."""
    stay_probability: float = 0.7
    """Chance the next item comes from the same cluster as the last."""
    transition_probability: float = 0.0
    """A planted sequential signal: this share of the steps that do not draw a fresh cluster moves to the successor
    of the previous step's cluster instead of staying. The successor is given by a fixed random permutation of the
    clusters (a Markov chain). Order then matters: the last item's cluster tells the next one, which a pooled bag of
    the history blurs. 0 keeps the draws of earlier versions exactly."""
    seed: int = 0
    """Seed of the one generator everything is drawn from."""


@dataclass
class DataConfig:
    """Where interactions come from and where the prepared cache goes."""

    source: str = "synthetic"
    """Where the interactions come from: synthetic | interactions (your own files) | movielens-100k | movielens-1m |
    movielens-latest-small | movielens-20m | movielens-25m | movielens-32m."""
    data_dir: str | None = None
    """MovieLens: the unpacked archive."""
    on_bad_rows: str = "error"
    """What prepare does with malformed rows: error (stop, naming the line) | skip (count and drop them)."""
    interactions_path: str | None = None
    """Source interactions: the one table of events (CSV, TSV or Parquet file, or a directory of Parquet files)."""
    users_path: str | None = None
    """Source interactions: an optional table of user features keyed by data.user_column; none: user ids only."""
    items_path: str | None = None
    """Source interactions: an optional table of item features keyed by data.item_column; none: item ids only."""
    user_column: str = "user"
    """Source interactions: the column of raw user ids (in the interactions and the users table)."""
    item_column: str = "item"
    """Source interactions: the column of raw item ids (in the interactions and the items table)."""
    timestamp_column: str = "timestamp"
    """Source interactions: the column of event times, in seconds or as dates (data.timestamp_format)."""
    timestamp_format: str = ""
    """Dates in the timestamp column: one strftime format for the whole column (e.g. "%d/%m/%Y", or "ISO8601").
    Empty: the one format every row fits, refused when two fit (05/07/2000)."""
    rating_column: str = "rating"
    """The column of ratings; optional in the file: missing -> every rating is 1.0."""
    genres_separator: str = "|"
    """What separates the genres in the text of the items table's genres column."""
    cache_dir: str = ""
    """The prepared cache; empty: <run_dir>/data."""
    split: str = "leave_last_out"
    """How events are split into train, validation and test: leave_last_out | temporal | random. leave_last_out:
    per user, last event = test, second-last = validation (SASRec / HSTU protocol). temporal: the latest events of
    the whole log. random: each event drawn with data.seed."""
    validation_fraction: float = 0.1
    """Share of the events in validation (temporal and random splits)."""
    test_fraction: float = 0.1
    """Share of the events in test (temporal and random splits)."""
    seed: int = 42
    """Seed of the random split."""
    min_interactions: int = 3
    """Users with fewer events are dropped (leave-last-out needs 3: train, validation, test)."""
    engine: str = "auto"
    """How prepare sorts, deduplicates, splits and encodes the interactions: auto | pandas | duckdb. pandas: in memory
    (a few hundred bytes a row at its peak: README, "Data bigger than memory"). duckdb: out of core, within
    data.memory_limit, spilling to data.spill_dir; the cache it writes is the same, byte for byte. auto: duckdb when
    data.interactions_path is a directory of Parquet files, pandas otherwise."""
    memory_limit: str = "4GB"
    """duckdb: its memory_limit (e.g. 500MB, 4GB); past it, it spills to disk."""
    threads: int = 0
    """duckdb: worker threads (0: one per core); each needs some of data.memory_limit."""
    spill_dir: str = ""
    """duckdb: where it spills; empty: a temporary folder beside data.cache_dir."""
    hash_buckets: dict[str, int] = field(default_factory=dict)
    """Hashed ids, per id feature (user_id | item_id): {user_id: 1000000} maps each raw user id to row
    1 + hash(id) % 1000000. That replaces a vocabulary built on training rows (data/features.py): no vocabulary to
    build, store or serve, and an id never seen in training still gets a row; distinct ids may share one (prepare
    reports the collision rate)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class FeaturesConfig:
    """Which features each tower sees and how long the history bag is."""

    user_features: list[str] = field(default_factory=lambda: ["user_id", "gender", "age", "occupation"])
    """The query tower's user features: user_id and columns of the users table, each with its own vocabulary."""
    item_features: list[str] = field(default_factory=lambda: ["item_id", "genres", "year"])
    """The item tower's sparse features: item_id and columns of the items table. genres is multi-valued, year is
    bucketed by 5 years, and title_tokens is the words of the title column."""
    history_length: int = 50
    """The last N items strictly before the interaction; 0 turns it off."""
    recent_items: int = 0
    """The k most recent items before the interaction as k features of their own (recent_1 is the last one). They
    are looked up in the history's table: the pooled bag forgets order."""
    share_item_table: bool = False
    """History looks up the item tower's item-id table instead of its own."""
    item_dense: list[str] = field(default_factory=lambda: ["year_norm"])
    """The item tower's dense features: year_norm (the standardised release year) is the only one; [] for none."""


@dataclass
class ModelConfig:
    """Tower shapes: every table has ``embedding_dim`` columns; MLP then projection to ``output_dim``."""

    embedding_dim: int = 32
    """Columns of every embedding table."""
    mlp_dims: list[int] = field(default_factory=lambda: [128])
    """Widths of each tower's hidden layers (Linear, then ReLU), in order; [] for the projection alone."""
    output_dim: int = 64
    """Width of the L2-normalised embedding both towers end in (the projection's output)."""
    dropout: float = 0.0
    """Dropout after each hidden layer of the towers' MLPs (0: none); in [0, 1)."""
    history_encoder: str = "bag"
    """How the query tower reads the history (one file each under twotower_rec/model/): bag | transformer | causal.
    bag: a mean-pooled bag, pooled with the other features. transformer: a transformer over the unpooled items,
    output at the most recent one (model/transformer.py). causal: a causal transformer over the items oldest first:
    its output at position t depends on items 0..t only, so one pass gives a query at every position; task=next_item
    needs it (model/causal.py)."""
    encoder_layers: int = 1
    """transformer | causal: transformer layers."""
    encoder_heads: int = 2
    """transformer | causal: attention heads."""
    encoder_dropout: float = 0.1
    """transformer | causal: dropout inside the encoder."""
    user_join: str = "concat"
    """How the user features join the causal encoder's state in the query MLP's input: concat | add. concat: side
    by side, F * E + E wide. add: summed into one E-wide vector. causal only."""
    history_mean: bool = False
    """causal: the mean of the history's items up to each position (a pooled bag) joins the query beside the causal
    state (concatenated, or added with user_join=add)."""
    members: int = 1
    """An ensemble: train this many two-tower members one after another and serve them as one model. Each member
    has seed train.seed + k and its own early stop; served, their embeddings lie side by side / sqrt(members), so
    a score is the mean of the members' cosines (model/ensemble.py, train/ensemble.py). Costs members x the
    training time and the embedding size."""


@dataclass
class LossConfig:
    """The sampled softmax over in-batch candidates that the softmax tasks (``task``: retrieval,
    next_item) train with: temperature, logQ, accidental hits, mixed negatives."""

    temperature: float = 0.2
    """The softmax temperature: scores (cosines of the L2-normalised embeddings) are divided by it."""
    learn_temperature: bool = False
    """Start at loss.temperature and learn it (kept within [0.01, 1])."""
    global_negatives: bool = True
    """Score each rank's queries against the items of the whole global batch (all-gathered). The loss, and
    training, then do not depend on the number of processes."""
    logq: str = "counts"
    """logQ correction (Yi et al. 2019), subtracting log(expected count in the batch) from every candidate's
    logit: counts | streaming | none. counts: from training frequencies. streaming: the paper's per-step frequency
    estimator (no global pass)."""
    logq_weight: float = 1.0
    """Scale of the correction: 1 = the paper's; 0 = none."""
    streaming_hash_size: int = 1 << 20
    """logq=streaming: slots of the estimator's hash table."""
    streaming_alpha: float = 0.01
    """logq=streaming: the estimator's moving-average rate."""
    uniform_negatives: int = 0
    """Mixed negative sampling (Yang et al. 2020): this many items drawn uniformly from the catalog per global batch
    join the in-batch candidates (0: in-batch only)."""
    mask_accidental_hits: bool = True
    """Drop in-batch candidates equal to the row's positive."""


@dataclass
class TrainConfig:
    """The training loop: batch, epochs, optimizers and their schedule, the validation and
    checkpoint schedule, early stopping, and how steps run (pipeline, bf16, threads)."""

    batch_size: int = 1024
    """Examples a global batch (task=next_item: windows)."""
    epochs: int = 3
    """Passes over the training examples."""
    max_steps: int = 0
    """Stop after this many steps; 0: run all epochs."""
    dense_lr: float = 1e-3
    """The dense layers' (AdamW) learning rate, before train.warmup_steps and train.lr_schedule scale it."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay of the dense layers."""
    warmup_steps: int = 0
    """Dense learning rate ramps linearly from 0 over these steps."""
    lr_schedule: str = "constant"
    """The dense learning rate's schedule: constant | cosine (decays to 0 at the last step)."""
    sparse_lr: float | None = None
    """The table learning rate; null: the table optimizer's own default. That is 0.05 for the Adagrads and SGD,
    0.001 for Adam (distributed/sharding.py SPARSE_LR_DEFAULTS)."""
    table_weight_decay: dict[str, float] = field(default_factory=dict)
    """L2 weight decay per table, by table name (as the sharding plan prints it), e.g. {t_history: 0.01}. fbgemm
    applies it inside the fused row-wise Adagrad update to the rows a batch touches. On CPU fbgemm applies it only
    to a pooled table read by two or more features (its fast path for a single feature passes no decay), so that
    is checked."""
    sparse_optimizer: str = "rowwise_adagrad"
    """The tables' optimizer, fused into backward: rowwise_adagrad | adagrad | sgd | adam (CUDA only)."""
    val_every_steps: int = 200
    """Validate every this many steps; 0: validate only at the end of each epoch."""
    val_max_users: int = 2000
    """Validation during training scores a seeded sample of this many events (0: all)."""
    select_metric: str = "ndcg@10"
    """The checkpoint kept is the one best on this validation metric."""
    early_stopping_patience: int = 0
    """Stop after this many validations without improvement (0: never)."""
    log_every_steps: int = 20
    """Read the steps' losses (one host sync, an all-reduce across ranks) and show them every this many steps."""
    seed: int = 0
    """Seed of the model's initial weights, each epoch's shuffle and the uniform negatives."""
    out_dir: str = ""
    """Checkpoints and metrics; empty: <run_dir>/train."""
    checkpoint_every_steps: int = 500
    """Save <out_dir>/last (model, optimizers, step, RNG) for --resume every this many steps; 0: at the end only."""
    bf16: bool = False
    """Autocast the towers' MLPs to bfloat16 (tables and the loss stay float32)."""
    tf32: bool = False
    """CUDA: float32 matrix products in TF32 (torch.set_float32_matmul_precision("high")) on Ampere and later GPUs.
    Several times faster than full float32; losses differ within launch/gpu_check.py's TOLERANCE["tf32"]. No effect
    on a CPU."""
    pipeline: str = "auto"
    """Whether steps run in TorchRec's TrainPipelineSparseDist: auto (with CUDA, tasks that allow it) | always |
    never."""
    num_threads: int = 0
    """Intra-op threads per process; 0: the policy (distributed/threads.py). The policy is usable cores / processes
    on this host, less one for a prefetch thread; OMP_NUM_THREADS when set."""
    prefetch_batches: int | None = None
    """Batches built ahead by a background thread while the step runs; 0: built on the main thread, between steps.
    On CUDA they are built in pinned memory, so the pipeline's copies overlap. null: 2 with CUDA, 0 on a CPU (there
    the thread competes with the step for the cores)."""
    progress: bool = True
    """Show training progress (rank 0): a bar on a terminal, plain lines into a file or a pipe."""
    progress_every_seconds: float = 30.0
    """Into a file or a pipe (nohup, Slurm, CI logs) the bar becomes a plain line this often and at every
    validation, instead of a carriage-return update every step."""
    tensorboard: bool | None = None
    """Write TensorBoard scalars to <out_dir>/tensorboard (rank 0): the loss of every step, the
    learning rates, examples/s, a learned temperature and every validation metric. null: on when
    the tensorboard package is installed (launch/setup.sh installs it), off otherwise; true: refuse
    to train without it; false: off. A resumed run appends to the same folder."""


@dataclass
class ShardingConfig:
    """How TorchRec's planner may place tables (see distributed/sharding.py)."""

    sharding_types: list[str] = field(default_factory=lambda: ["table_wise"])
    """The sharding types the planner may give a table: table_wise | row_wise | column_wise | table_row_wise."""
    compute_kernel: str = "fused"
    """Where tables live and how they are updated: fused | fused_uvm_caching | dense. fused: tables in device memory
    (GPU or CPU RAM), updated inside the backward. fused_uvm_caching (CUDA only): tables in host memory, a cache of
    hot rows on the GPU, for tables larger than GPU memory. dense: plain autograd tables (for debugging)."""
    cache_load_factor: float = 0.2
    """fused_uvm_caching: the share of each table's rows cached on the GPU."""


@dataclass
class DistributedConfig:
    """The process group of a multi-process run (``torchrun``)."""

    timeout_minutes: float = 60.0
    """How long a collective waits for the other ranks before the job is stopped (NCCL's watchdog). A checkpoint
    save of a large table to a shared filesystem can take minutes."""


@dataclass
class EvalConfig:
    """Full-catalog evaluation: cut-offs, seen-item filtering, split, and the baselines' settings."""

    ks: list[int] = field(default_factory=lambda: [10, 50, 100, 200])
    """The cut-offs K of the metrics evaluate reports (recall@K, ndcg@K); ranked lists are max(ks) long."""
    filter_seen: bool = True
    """Remove the items a user interacted with before the event from its ranked list (validation too)."""
    split: str = "test"
    """The split evaluate scores: test | validation."""
    user_chunk: int = 1024
    """Queries scored against the whole catalog at once."""
    max_users: int = 0
    """evaluate: 0 scores every event of eval.split; otherwise a seeded sample of this many. Validation during
    training samples train.val_max_users instead."""
    ease_lambda: float = 500.0
    """evaluate --baselines (see twotower_rec/evaluation/baselines.py): the ease baseline's L2 regularisation."""
    transition_last: int = 3
    """evaluate --baselines: last items a transition-model query looks at."""
    transition_decay: float = 0.5
    """evaluate --baselines: weight of the m-th last item in a transition-model query: decay^(m-1)."""


@dataclass
class ExportConfig:
    """The export directory: embedding dtype and the ANN index (kind, parameters, how its recall
    is measured)."""

    dir: str = ""
    """The export folder; empty: <run_dir>/export."""
    dtype: str = "float32"
    """item_embeddings.npy: float32 | float16 (half the size; scored in float32)."""
    ann: str = "hnsw"
    """items.faiss: flat (exact) | hnsw | ivf | none."""
    hnsw_m: int = 32
    """hnsw: the graph degree."""
    hnsw_ef_construction: int = 200
    """hnsw: candidates explored per added vector."""
    hnsw_ef_search: int = 128
    """hnsw: candidates explored per query (serving sets it from the manifest)."""
    ivf_nlist: int = 0
    """ivf: clusters; 0: about 4 * sqrt(items)."""
    ivf_nprobe: int = 16
    """ivf: clusters searched per query, at most ivf_nlist (serving sets it from the manifest)."""
    recall_queries: int = 2000
    """Users whose query embeddings measure the index's recall against exact search."""
    torchscript: bool = False
    """Also write ``query_tower.pt``, the TorchScript query tower, beside ``query_tower.pt2``: deprecated
    (PyTorch deprecated ``torch.jit.script``), kept for one release; serving reads ``query_tower.pt2``."""


@dataclass
class CommonConfig:
    """The sections every run has; :data:`Config` adds one section per task that has options
    of its own (``twotower_rec/tasks/``)."""

    run_dir: str = "runs/demo"
    """The folder of a run: data.cache_dir, train.out_dir and export.dir are <run_dir>/data, <run_dir>/train and
    <run_dir>/export unless set."""
    task: str = "retrieval"
    """The training mode (twotower_rec/tasks/, one file each): retrieval | pointwise | next_item | bpr. retrieval:
    in-batch sampled softmax over events. pointwise: BCE on a rating threshold, or rating MSE. next_item: every
    position of a window of a user's sequence scores the next item; the causal encoder. bpr: pairwise, each
    positive against the batch's other items."""
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _config_class() -> type:
    """``Config``: :class:`CommonConfig` plus each task's own section (``task.section`` of type
    ``task.Options``), so a task adds its options from its own file."""
    from twotower_rec.tasks import TASKS

    sections = [(task.section, task.Options, field(default_factory=task.Options))
                for task in TASKS.values() if task.Options is not None]
    return dataclasses.make_dataclass(
        "Config", sections, bases=(CommonConfig,),
        namespace={"__doc__": "The whole config: one section per component and per task that has options; each "
                              "component receives its own section.", "__module__": __name__})


Config = _config_class()

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "interactions", "movielens-100k", "movielens-1m", "movielens-latest-small",
                    "movielens-20m", "movielens-25m", "movielens-32m"),
    "data.on_bad_rows": ("error", "skip"),
    "data.split": ("leave_last_out", "temporal", "random"),
    "data.engine": ("auto", "pandas", "duckdb"),
    "train.sparse_optimizer": ("rowwise_adagrad", "adagrad", "sgd", "adam"),
    "train.pipeline": ("auto", "always", "never"),
    "train.lr_schedule": ("constant", "cosine"),
    "model.history_encoder": ("bag", "transformer", "causal"),
    "model.user_join": ("concat", "add"),
    "loss.logq": ("counts", "streaming", "none"),
    "export.dtype": ("float32", "float16"),
    "export.ann": ("flat", "hnsw", "ivf", "none"),
    "sharding.compute_kernel": ("fused", "fused_uvm_caching", "dense"),
    "eval.split": ("test", "validation"),
}
# data_parallel is left out: it replicates whole tables on every rank and cannot use the fused
# kernel, which is what this package is for.
HASHABLE_FEATURES = ("user_id", "item_id")  # the id features whose spaces can be too large or open-ended
_SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise")
RANKING_METRICS = ("ndcg@10", "recall@10", "ndcg@50", "recall@50", "mrr")  # what validation always computes
_POSITIVE = (
    "data.synthetic.num_users", "data.synthetic.num_items", "data.synthetic.interactions_per_user",
    "data.synthetic.num_clusters", "data.synthetic.num_genres", "data.synthetic.clusters_per_user",
    "model.embedding_dim", "model.output_dim", "train.batch_size", "train.epochs", "train.log_every_steps",
    "eval.user_chunk", "model.encoder_layers", "model.encoder_heads",
)
# Options of earlier versions and where they went (a config naming one gets this in its error).
MOVED = {
    "loss.name": "task (in_batch_softmax -> task: retrieval; bce, mse -> task: pointwise with "
                 "pointwise.objective: bce | mse)",
    "loss.rating_threshold": "pointwise.rating_threshold",
    "loss.negative_ratio": "pointwise.negative_ratio",
    "loss.chunk_size": "retrieval.chunk_size",
    "loss.batch_negatives": "retrieval.batch_negatives",
    "loss.future_targets": "next_item.future_targets",
    "loss.mask_window_items": "next_item.mask_window_items",
    "train.examples": "task (events -> task: retrieval or pointwise; sequences -> task: next_item)",
    "train.windows": "next_item.windows",
    "train.window_context": "next_item.window_context",
    "train.compile": "retrieval.compile",
    "model.user_encoder": "model.history_encoder (its value sequence is now transformer)",
    "model.sequence_layers": "model.encoder_layers",
    "model.sequence_heads": "model.encoder_heads",
    "model.sequence_dropout": "model.encoder_dropout",
}
# Options of the shared loss section and the encoders that only some settings read: a value
# set away from its default where nothing reads it is reported (config_warnings).
_ENCODER_OPTIONS = ("model.encoder_layers", "model.encoder_heads", "model.encoder_dropout")


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type, converting YAML/CLI scalars where lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, e.g. {{t_history: 0.01}}, got {value!r}")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):  # YAML 1.1 reads 2e-3 as a string
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _merge(obj: Any, data: dict, prefix: str) -> None:
    """Write ``data`` into the dataclass ``obj`` in place, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            if dotted in MOVED:
                raise ConfigError(f"unknown config key '{dotted}': it was renamed; use {MOVED[dotted]}")
            raise ConfigError(f"unknown config key '{dotted}'{closest(str(key), names, prefix)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config, warn: bool = True) -> Config:
    """Fill the run paths from ``run_dir``, check values that types alone do not catch (raise
    :class:`ConfigError` naming the key) and the task's own checks.

    Args:
        cfg: the config, changed in place (empty run paths are filled in).
        warn: issue a :class:`ConfigWarning` for each option set where nothing reads it.

    Returns:
        ``cfg``.
    """
    from twotower_rec.tasks import TASKS, task_class

    derive_paths(cfg)
    check_run_folders(cfg)
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_combinations(cfg)
    _check_encoders(cfg)
    for each in TASKS.values():
        each.check_options(cfg)
    task = task_class(cfg.task)
    task.check_config(cfg)
    selectable = RANKING_METRICS + task.metrics(cfg)
    if cfg.train.select_metric not in selectable:
        metric = cfg.train.select_metric
        raise ConfigError(f"train.select_metric: '{metric}' is not one of {list(selectable)} (what validation of "
                          f"task={cfg.task} computes){closest(metric, list(selectable))}")
    if cfg.model.members > 1 and not task.ensembles:
        raise ConfigError(f"model.members={cfg.model.members}: ensembles are trained for task=retrieval only, not "
                          f"task={cfg.task}")
    if warn:
        for message in config_warnings(cfg):
            warnings.warn(message, ConfigWarning, stacklevel=2)
    return cfg


def derive_paths(cfg: Config) -> None:
    """``data.cache_dir``, ``train.out_dir`` and ``export.dir`` left empty become ``<run_dir>/data``,
    ``<run_dir>/train`` and ``<run_dir>/export``.

    Args:
        cfg: the config, changed in place.
    """
    run = Path(cfg.run_dir)
    if not cfg.data.cache_dir:
        cfg.data.cache_dir = str(run / "data")
    if not cfg.train.out_dir:
        cfg.train.out_dir = str(run / "train")
    if not cfg.export.dir:
        cfg.export.dir = str(run / "export")


def check_run_folders(cfg: Config, export_dir: str | Path | None = None) -> None:
    """Raise :class:`ConfigError` when two of ``data.cache_dir``, ``train.out_dir`` and
    ``export.dir`` are one folder or one lies inside another: ``prepare`` and ``export`` replace
    their folder whole, so the next run of either would delete the other's files.

    Args:
        cfg: the config, its paths filled in (:func:`derive_paths`).
        export_dir: the export folder to check instead of ``export.dir`` (``export --out``).
    """
    folders = {"data.cache_dir": cfg.data.cache_dir, "train.out_dir": cfg.train.out_dir,
               "export.dir": str(export_dir or cfg.export.dir)}
    resolved = {key: Path(value).expanduser().resolve() for key, value in folders.items()}
    keys = list(folders)
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:
            a, b = resolved[first], resolved[second]
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise ConfigError(f"{first}={folders[first]} and {second}={folders[second]} overlap: each must be "
                                  "a folder of its own, neither inside the other (prepare and export replace "
                                  "theirs whole)")


def config_warnings(cfg: Config) -> list[str]:
    """One line per option set away from its default where nothing reads it: the options of a
    task section (and of the shared ``loss`` section) that ``cfg.task`` does not read, and the
    encoder options under ``model.history_encoder: bag``.

    Args:
        cfg: the config, compared with the defaults of :data:`Config`.
    """
    from twotower_rec.tasks import TASKS, task_class

    task = task_class(cfg.task)
    sections = ["loss"] + [t.section for t in TASKS.values() if t.Options is not None]
    defaults = Config()
    found = []
    for section in sections:
        for f in dataclasses.fields(getattr(cfg, section)):
            key = f"{section}.{f.name}"
            if task.reads_option(key) or _get(cfg, key) == _get(defaults, key):
                continue
            readers = [t.name for t in TASKS.values() if t.reads_option(key)]
            found.append(f"{key}={_get(cfg, key)} is read by task={' | '.join(readers)} only; task={cfg.task} "
                         "ignores it")
    if cfg.model.history_encoder == "bag":
        for key in _ENCODER_OPTIONS:
            if _get(cfg, key) != _get(defaults, key):
                found.append(f"{key}={_get(cfg, key)} configures the transformer and causal history encoders; "
                             "model.history_encoder=bag ignores it")
    return found


def _check_choices(cfg: Config) -> None:
    """Every enumerated value is one of its choices; every listed sharding type is known."""
    from twotower_rec.tasks import TASKS

    if cfg.model.history_encoder == "sequence":
        raise ConfigError("model.history_encoder: 'sequence' is now called 'transformer' (the per-event transformer "
                          "over the history)")
    for key, choices in {**_CHOICES, "task": tuple(TASKS)}.items():
        check_choice(key, _get(cfg, key), choices)
    if not cfg.sharding.sharding_types:
        raise ConfigError("sharding.sharding_types: give at least one sharding type")
    for value in cfg.sharding.sharding_types:
        if value not in _SHARDING_TYPES:
            raise ConfigError(
                f"sharding.sharding_types: '{value}' is not one of {list(_SHARDING_TYPES)}"
                f"{closest(value, list(_SHARDING_TYPES))}"
            )


def _check_ranges(cfg: Config) -> None:
    """Numbers within their ranges."""
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")
    at_least_zero = {"train.checkpoint_every_steps": " (0 = at the end only)", "train.max_steps": " (0 = all epochs)",
                     "loss.logq_weight": "", "loss.uniform_negatives": "", "features.history_length": "",
                     "train.progress_every_seconds": "", "data.threads": " (0 = one per core)"}
    if cfg.train.prefetch_batches is not None:
        at_least_zero["train.prefetch_batches"] = " (0 = built between steps; null = 2 with CUDA, 0 on a CPU)"
    for key, meaning in at_least_zero.items():
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0{meaning}, got {_get(cfg, key)}")
    if cfg.model.members < 1:
        raise ConfigError(f"model.members: must be at least 1, got {cfg.model.members}")
    if cfg.distributed.timeout_minutes <= 0:
        raise ConfigError(f"distributed.timeout_minutes: must be positive, got {cfg.distributed.timeout_minutes}")
    if cfg.loss.temperature <= 0:
        raise ConfigError(f"loss.temperature: must be positive, got {cfg.loss.temperature}")
    for table, decay in cfg.train.table_weight_decay.items():
        if decay < 0:
            raise ConfigError(f"train.table_weight_decay.{table}: must be >= 0, got {decay}")
    if not 0.0 <= cfg.data.synthetic.stay_probability <= 1.0:
        raise ConfigError("data.synthetic.stay_probability: must lie in [0, 1]")
    if not 0.0 <= cfg.data.synthetic.transition_probability <= 1.0:
        raise ConfigError("data.synthetic.transition_probability: must lie in [0, 1]")
    for key in ("model.dropout", "model.encoder_dropout"):
        if not 0.0 <= _get(cfg, key) < 1.0:
            raise ConfigError(f"{key}: must lie in [0, 1), got {_get(cfg, key)}")
    if not cfg.eval.ks or min(cfg.eval.ks) <= 0:
        raise ConfigError(f"eval.ks: give positive cut-offs, got {cfg.eval.ks}")
    for name, buckets in cfg.data.hash_buckets.items():
        if name not in HASHABLE_FEATURES:
            raise ConfigError(f"data.hash_buckets: '{name}' cannot be hashed (only {list(HASHABLE_FEATURES)})"
                              f"{closest(name, list(HASHABLE_FEATURES))}")
        if buckets < 1:
            raise ConfigError(f"data.hash_buckets.{name}: must be at least 1, got {buckets}")
    if cfg.data.min_interactions < 1:
        raise ConfigError("data.min_interactions: must be at least 1")
    fractions = (cfg.data.validation_fraction, cfg.data.test_fraction)
    if min(fractions) < 0 or sum(fractions) >= 1:
        raise ConfigError("data.validation_fraction + data.test_fraction: each >= 0 and together below 1")


def _check_combinations(cfg: Config) -> None:
    """Values that must agree with each other."""
    if cfg.features.recent_items < 0 or cfg.features.recent_items > cfg.features.history_length:
        raise ConfigError(f"features.recent_items: must lie in [0, features.history_length="
                          f"{cfg.features.history_length}], got {cfg.features.recent_items}")
    if any(decay > 0 for decay in cfg.train.table_weight_decay.values()) and (
            cfg.train.sparse_optimizer != "rowwise_adagrad"):
        raise ConfigError("train.table_weight_decay: fbgemm applies it with train.sparse_optimizer="
                          f"rowwise_adagrad only, not {cfg.train.sparse_optimizer}")
    if cfg.data.split == "leave_last_out" and cfg.data.min_interactions < 3:
        raise ConfigError("data.min_interactions: leave-last-out needs at least 3 (train, validation, test)")
    if "item_id" in cfg.data.hash_buckets and cfg.features.share_item_table:
        raise ConfigError("data.hash_buckets.item_id: the history looks items up by their code in a shared "
                          "table (features.share_item_table), which a hashed item_id table does not have; turn "
                          "one of them off")
    if cfg.data.synthetic.clusters_per_user > cfg.data.synthetic.num_clusters:
        raise ConfigError("data.synthetic.clusters_per_user: must not exceed data.synthetic.num_clusters")


def _check_encoders(cfg: Config) -> None:
    """The history encoders: what the causal one needs and what only it reads."""
    model, features = cfg.model, cfg.features
    if model.user_join == "add" and model.history_encoder != "causal":
        raise ConfigError("model.user_join=add sums the user features into the causal encoder's state: it needs "
                          f"model.history_encoder=causal, not {model.history_encoder}")
    if model.history_mean and model.history_encoder != "causal":
        raise ConfigError("model.history_mean joins the causal encoder's state: it needs "
                          f"model.history_encoder=causal, not {model.history_encoder}")
    if model.history_encoder == "causal":
        if features.history_length <= 0:
            raise ConfigError("model.history_encoder=causal reads the history: set features.history_length > 0")
        if features.recent_items:
            raise ConfigError("model.history_encoder=causal already reads the last items in order: set "
                              f"features.recent_items=0, not {features.recent_items}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.batch_size=2048'`` -> (['train', 'batch_size'], 2048); the value is read as YAML.

    Args:
        text: one ``--set`` value, ``KEY=VALUE`` with a dotted key. A value that is not valid YAML
            is kept as plain text (e.g. ``%d/%m/%Y``) unless it starts like a list, mapping or
            quoted string.
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. train.batch_size=2048")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        if raw.strip()[:1] in "[{\"'":  # meant as a list, mapping or quoted string
            raise ConfigError(f"override '{text}': value is not valid YAML ({err.problem})") from None
        value = raw.strip()  # plain text YAML cannot read, e.g. a date format %d/%m/%Y
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides``; validated.

    Args:
        path: a YAML config file; None: the defaults only.
        overrides: ``KEY=VALUE`` strings as ``--set`` takes them (:func:`parse_override`),
            applied in order after the file, so a later one wins.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(_utf8_text(path)) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        try:
            _merge(cfg, data, "")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides or []:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        try:
            _merge(cfg, nested, "")
        except ConfigError as err:
            raise ConfigError(f"--set {text}: {err}") from None
    return validate(cfg)


def _utf8_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None


def to_dict(cfg: Config) -> dict:
    """The config as nested plain dicts, one per section, as checkpoints and exports save it.

    Args:
        cfg: the config.
    """
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a config saved in a checkpoint or export (checked like a YAML file, without
    warnings: they were given when it was trained).

    Args:
        data: the nested dicts :func:`to_dict` wrote; a missing key keeps its default.
    """
    cfg = Config()
    _merge(cfg, data, "")
    return validate(cfg, warn=False)
