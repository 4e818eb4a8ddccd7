"""The GPU / multi-node path, checked where it can be on the CPU.

``launch/gpu_check.sh --cpu --quick`` runs every model variant through TorchRec's train
pipeline at one and two gloo processes against the non-pipelined one-process run, then
evaluate, export, recommend and a resume from two processes onto one; the rest are the pieces
a GPU run depends on that a CPU can still check: per-optimizer table learning rates, the
planner's topology, a checkpoint trained with a CUDA-only table optimizer loading for
evaluation on a CPU, per-rank random streams, the device choice, batches built ahead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from twotower_rec.config import ShardingConfig, TrainConfig
from twotower_rec.distributed import env as dist_env
from twotower_rec.distributed.env import DistEnv
from twotower_rec.distributed.sharding import _topology, sparse_lr
from twotower_rec.errors import ConfigError
from twotower_rec.train.batch_order import BatchesAhead, prefetch_depth
from twotower_rec.train.checkpoint import rng_state, set_rng_state
from twotower_rec.train.step import LossLog

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import gpu_check  # noqa: E402


def test_gpu_check_cpu_mode_passes_every_check(tmp_path):
    """The script itself, in the mode a CPU can run: every variant, pipeline on, 1 and 2 ranks."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--cpu", "--quick", "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=900, env=env)
    report = json.loads((tmp_path / "work" / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = {(r["check"], r["world"]): r["result"] for r in report["rows"]}
    for variant in gpu_check.VARIANTS:
        for world in ("1", "2"):
            assert rows[(gpu_check.label(variant), world)] == "PASS"
    for check in ("row-wise plan (pipeline)", "evaluate (vs 1 CPU process)", "export"):
        assert rows[(check, "2")] == "PASS"
    assert rows[("recommend", "1")] == rows[("--resume from 2 to 1", "1")] == "PASS"
    assert report["passed"] is True and "PASS" in proc.stdout.splitlines()[-1]


def test_gpu_check_fails_a_run_that_differs(tmp_path):
    """The comparison can fail: a loss off by more than the tolerance is a FAIL row and exit 1."""
    args = gpu_check.parse_args(["--cpu", "--work", str(tmp_path)])
    check = gpu_check.Check(args)
    for name, values in (("ref", [5.0, 4.0, 3.0]), ("same", [5.0, 4.0, 3.0]), ("off", [5.0, 4.01, 3.0])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_metrics.json").write_text(json.dumps({"losses": values}))
    check.compare("same", "2", tmp_path / "same", tmp_path / "ref", 1e-5, 0.0)
    check.compare("off", "2", tmp_path / "off", tmp_path / "ref", 1e-5, 0.0)
    assert [r.result for r in check.rows] == ["PASS", "FAIL"]
    assert check.finish() == 1
    assert json.loads((tmp_path / "gpu_check.json").read_text())["passed"] is False


@pytest.mark.parametrize("edit", [{"sparse_optimizer": "adam"}, {"table_weight_decay": {"t_item_id": 0.1}}],
                         ids=["fused_adam", "one_feature_table_decay"])
def test_a_checkpoint_with_a_cuda_only_table_optimizer_evaluates_and_exports_on_cpu(pipeline, cli, tmp_path, edit):
    """Training with these needs CUDA; evaluating and exporting what was trained must not."""
    run = tmp_path / "run"
    shutil.copytree(pipeline.out_dir / "checkpoint", run / "checkpoint")
    meta_path = run / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["train"].update(edit)
    meta_path.write_text(json.dumps(meta))
    args = ("--config", pipeline.config_path, "--set", f"train.out_dir={run}")
    evaluated = cli("evaluate", *args, "--output", tmp_path / "eval.json", cwd=pipeline.root)
    assert evaluated.returncode == 0, evaluated.describe()
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == pipeline.eval_results["model"]
    exported = cli("export", *args, "--out", tmp_path / "export", cwd=pipeline.root)
    assert exported.returncode == 0, exported.describe()


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_evaluate_from_a_checkpoint_of_each_cpu_table_optimizer(pipeline, cli, tmp_path, optimizer):
    run = tmp_path / "run"
    args = ("--config", pipeline.config_path, "--set", f"train.out_dir={run}")
    trained = cli("train", *args, "--set", f"train.sparse_optimizer={optimizer}", "--set", "train.max_steps=3",
                  cwd=pipeline.root)
    assert trained.returncode == 0, trained.describe()
    evaluated = cli("evaluate", *args, "--output", tmp_path / "eval.json", cwd=pipeline.root)
    assert evaluated.returncode == 0, evaluated.describe()
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["model"]["recall@10"] <= 1


def test_table_learning_rate_defaults_per_optimizer():
    assert sparse_lr(TrainConfig()) == 0.05  # row-wise Adagrad, the default
    assert sparse_lr(TrainConfig(sparse_optimizer="adam")) == 1e-3
    assert sparse_lr(TrainConfig(sparse_optimizer="adam", sparse_lr=0.01)) == 0.01
    assert sparse_lr(TrainConfig(sparse_lr=0.0)) == 0.0  # 0 freezes the tables, as it always did


def test_topology_knows_the_processes_per_host_and_their_share_of_its_memory():
    from twotower_rec.distributed.sharding import host_memory

    env = DistEnv(rank=0, local_rank=0, world_size=16, device=torch.device("cpu"), backend="gloo",
                  local_world_size=8)
    topology = _topology(env)
    assert topology.world_size == 16 and topology.local_world_size == 8
    assert 1 << 30 < host_memory() < 1 << 50  # this machine: some GiB
    assert all(device.storage.ddr == host_memory() // 8 for device in topology.devices)


def test_the_planner_is_told_each_ranks_batch(monkeypatch):
    """The planner's cost model sizes each rank's input (it assumes 512 rows otherwise)."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from twotower_rec.distributed import sharding

    seen = {}
    real = sharding.EmbeddingShardingPlanner

    def planner(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "EmbeddingShardingPlanner", planner)
    model = torch.nn.Module()
    model.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10,
                                                                  feature_names=["f"])], device=torch.device("meta"))
    env = dist_env.init_distributed()
    try:
        sharding.shard_model(model, env, ShardingConfig(), TrainConfig(batch_size=96))
    finally:
        dist_env.shutdown()
    assert seen["batch_size"] == 96  # one process: the whole batch


def test_the_process_group_waits_as_long_as_configured(monkeypatch):
    import datetime

    seen = {}
    monkeypatch.setattr(dist_env.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_env.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv(dist_env.DEVICE_VARIABLE, "cpu")
    dist_env.init_distributed(timeout_minutes=90)
    assert seen["timeout"] == datetime.timedelta(minutes=90) and seen["backend"] == "gloo"
    from twotower_rec.config import load_config

    assert load_config(None).distributed.timeout_minutes == 60  # NCCL's own default is 10
    with pytest.raises(ConfigError, match="distributed.timeout_minutes: must be positive"):
        load_config(None, ["distributed.timeout_minutes=0"])


def test_tf32_is_turned_on_for_cuda_only():
    from twotower_rec.train.trainer import use_tf32

    before = torch.get_float32_matmul_precision()
    try:
        assert not use_tf32(True, torch.device("cpu")) and torch.get_float32_matmul_precision() == before
        assert not use_tf32(False, torch.device("cuda"))
        assert use_tf32(True, torch.device("cuda")) and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_uvm_caching_kernel_is_refused_on_cpu():
    from twotower_rec.distributed.sharding import shard_model

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match="fused_uvm_caching.*CUDA only"):
        shard_model(torch.nn.Linear(1, 1), env, ShardingConfig(compute_kernel="fused_uvm_caching"), TrainConfig())


def test_ranks_get_their_own_dropout_streams_and_rank_zero_keeps_its_own():
    def draws(rank: int) -> torch.Tensor:
        torch.manual_seed(0)
        dist_env.seed_rank_streams(0, rank)
        return torch.rand(4)

    torch.manual_seed(0)
    unseeded = torch.rand(4)
    assert torch.equal(draws(0), unseeded)  # a world of one draws what it always drew
    assert not torch.equal(draws(0), draws(1))
    assert not torch.equal(draws(1), draws(2))


def test_rng_state_holds_no_other_gpus_and_old_states_load():
    state = rng_state()
    assert state["cuda"] is None or isinstance(state["cuda"], torch.Tensor)  # this rank's GPU, not a list
    set_rng_state({**state, "cuda": [torch.zeros(8, dtype=torch.uint8)] * 3})  # an older checkpoint's list


@pytest.mark.parametrize("value, expected", [("cpu", "cpu"), ("auto", "cpu"), ("", "cpu")])
def test_device_choice(monkeypatch, value, expected):
    monkeypatch.setenv(dist_env.DEVICE_VARIABLE, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist_env, "_gpus_present", lambda: False)
    assert dist_env.choose_device(0).type == expected


def test_cuda_asked_for_but_missing_is_an_error_not_a_silent_cpu_run(monkeypatch):
    monkeypatch.setenv(dist_env.DEVICE_VARIABLE, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="setup.sh"):
        dist_env.choose_device(0)
    monkeypatch.setenv(dist_env.DEVICE_VARIABLE, "tpu")
    with pytest.raises(ValueError, match="auto, cuda or cpu"):
        dist_env.choose_device(0)


def test_gpus_torch_cannot_use_are_reported(monkeypatch, capsys):
    monkeypatch.delenv(dist_env.DEVICE_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist_env, "_gpus_present", lambda: True)
    assert dist_env.choose_device(0).type == "cpu"
    assert "running on the CPU" in capsys.readouterr().err


def test_batches_ahead_yields_the_same_batches_and_raises_where_the_source_did():
    assert list(BatchesAhead(iter(range(7)), depth=2)) == list(range(7))

    def failing():
        yield 1
        raise ValueError("row 5 is bad")

    ahead = BatchesAhead(failing(), depth=2)
    assert next(ahead) == 1
    with pytest.raises(ValueError, match="row 5"):
        next(ahead)


def test_batches_are_built_ahead_only_with_cuda_by_default():
    """A background thread on a CPU-only machine competes with the step for the cores and the
    GIL (0.5x the examples/s at batch 256 on 2 cores, docs/benchmarks-history.md, "Batches built
    ahead on a CPU"): ahead only with CUDA."""
    assert prefetch_depth(TrainConfig(), torch.device("cpu")) == 0
    assert prefetch_depth(TrainConfig(), torch.device("cuda", 0)) == 2
    assert prefetch_depth(TrainConfig(prefetch_batches=3), torch.device("cpu")) == 3
    assert prefetch_depth(TrainConfig(prefetch_batches=0), torch.device("cuda", 0)) == 0


def test_batches_ahead_close_stops_its_thread():
    def endless():
        n = 0
        while True:
            yield n
            n += 1

    before = threading.active_count()
    ahead = BatchesAhead(endless(), depth=2)
    assert next(ahead) == 0
    ahead.close()
    assert not ahead._thread.is_alive() and threading.active_count() == before


def test_loss_log_reads_every_step_once():
    log = LossLog()
    for value in (3.0, 2.5, 2.0):
        log.add(torch.tensor(value))
    assert log.read() == [3.0, 2.5, 2.0]
    assert log.read() == []


@pytest.mark.parametrize("tag", ["cu128", "cu126"])
def test_cuda_setup_takes_torch_and_fbgemm_from_one_index_after_removing_the_cpu_build(tmp_path, tag):
    """``DEVICE=cuda bash launch/setup.sh`` as it would run (``SETUP_DRY_RUN=1`` prints the
    commands): the CPU fbgemm package goes first (both own fbgemm_gpu/*.so), and torch and
    fbgemm-gpu come from PyTorch's index for the tag alone, never from PyPI as a fallback."""
    env = {**os.environ, "SETUP_DRY_RUN": "1", "DEVICE": "cuda", "CUDA": tag, "VENV": str(tmp_path / "venv")}
    proc = subprocess.run(["bash", str(REPO / "launch" / "setup.sh")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    uninstall = next(i for i, c in enumerate(commands) if "uninstall" in c and "fbgemm-gpu-cpu" in c)
    cuda_pair = [i for i, c in enumerate(commands) if "fbgemm-gpu==1.8.0" in c]
    assert cuda_pair and uninstall < min(cuda_pair)
    for command in (c for c in commands if "install" in c and "uninstall" not in c):
        if "fbgemm-gpu==" in command or command.split()[-1].startswith("torch=="):
            assert f"--index-url https://download.pytorch.org/whl/{tag}" in command, command
        assert "--extra-index-url" not in command and "fbgemm-gpu-cpu==" not in command, command
    assert "CUDA 12.8" in proc.stdout if tag == "cu128" else "CUDA 12.6" in proc.stdout
    bad = subprocess.run(["bash", str(REPO / "launch" / "setup.sh")], capture_output=True, text=True,
                         env={**env, "CUDA": "13"}, timeout=60)
    assert bad.returncode == 2 and "expected a PyTorch index tag" in bad.stderr


def test_the_multi_node_scripts_fail_fast_without_a_gpu_and_give_srun_its_cpus():
    """Read, not run (no cluster here): multi_node.sh defaults TWOTOWER_DEVICE to cuda, as the
    other GPU launchers do, and slurm.sbatch hands srun the task's CPUs."""
    multi = (REPO / "launch" / "multi_node.sh").read_text()
    assert "export TWOTOWER_DEVICE=${TWOTOWER_DEVICE:-cuda}" in multi
    assert multi.index("export TWOTOWER_DEVICE") < multi.index("exec .venv/bin/torchrun")
    slurm = (REPO / "launch" / "slurm.sbatch").read_text()
    assert 'srun --cpus-per-task="$CPUS"' in slurm
