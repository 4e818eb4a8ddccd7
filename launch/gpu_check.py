"""The self-test of the GPU path: ``bash launch/gpu_check.sh`` (see that file for the usage).

On a tiny synthetic job it trains every model variant with TorchRec's train pipeline on, at one
process and at every visible GPU, and compares each run's per-step losses with the same run on
one CPU process in float32, without the pipeline (the reference). Then bf16, fused Adam tables,
the UVM-caching kernel and a row-wise plan; then validation, ``evaluate``, ``export``,
``recommend`` and ``train --resume`` from N processes onto one. Every check is one row of a
PASS / FAIL / SKIP table (printed, and written as JSON); the exit status is 1 if any row failed.

``--cpu`` runs the same checks on CPU processes (gloo, 2 of them) instead of GPUs: the suite
runs ``--cpu --quick`` so the script itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# Relative tolerance on per-step losses (max |a - b| / max |a|). One CPU process against several
# is exact up to float32 summation order; a GPU against the CPU differs by its kernels' order
# (TF32 stays off unless train.tf32: torch's default for float32 matmuls); TF32 keeps 10 bits of the
# mantissa in the products; bf16 autocast rounds the towers' inputs.
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3, "bf16": 5e-2, "tf32": 5e-3}

# name -> (prepared-data variant, config overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("base", []),
    "shared_item_table": ("shared", []),
    "transformer_encoder": ("base", ["model.history_encoder=transformer", "model.encoder_dropout=0.0"]),
    "recent_items": ("recent", []),
    "ensemble": ("base", ["model.members=2"]),
    "pointwise": ("base", ["task=pointwise"]),
    "batch_negatives": ("base", ["retrieval.batch_negatives=16"]),
    "next_item": ("base", ["task=next_item", "model.history_encoder=causal", "model.encoder_dropout=0.0"]),
    # the causal encoder read per event (task=retrieval), over a table of its own / the item tower's
    "causal_events": ("base", ["model.history_encoder=causal", "model.encoder_dropout=0.0"]),
    "causal_events_shared": ("shared", ["model.history_encoder=causal", "model.encoder_dropout=0.0"]),
}
# Variants whose training never runs through TorchRec's pipeline (task=next_item: see docs/distributed.md).
UNPIPELINED = {"next_item"}


def label(variant: str) -> str:
    """The table's name for a variant's training check."""
    return f"{variant} ({'no pipeline' if variant in UNPIPELINED else 'pipeline'})"
DATA_VARIANTS = {"base": [], "shared": ["features.share_item_table=true"], "recent": ["features.recent_items=2"]}


@dataclass
class Row:
    check: str
    world: str
    result: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float


class Check:
    """Runs the CLI in a work folder and records one row per check."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if args.cpu else "cuda"
        self.rows: list[Row] = []
        self.config = self.work / "check.yaml"
        self.steps = args.steps

    # ---- running the CLI ----
    def cli(self, name: str, verb: str, *args: str, nproc: int = 1, device: str | None = None,
            data: str = "base") -> tuple[int, str]:
        """``twotower-rec VERB --config check.yaml ARGS`` at ``nproc`` processes; (status, log)."""
        device = device or self.device
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        env["TWOTOWER_DEVICE"] = device
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if device == "cpu":
            env["OMP_NUM_THREADS"] = "1" if nproc > 1 else env.get("OMP_NUM_THREADS", "2")
        launcher = [sys.executable, "-m", "twotower_rec"]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "twotower_rec"]
        overrides = [f"data.cache_dir={self.work / ('data-' + data)}", *DATA_VARIANTS[data]]
        config = [] if verb == "recommend" else ["--config", str(self.config),
                                                 *(a for o in overrides for a in ("--set", o))]
        argv = [*launcher, verb, *config, *args]
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as out:
            out.write(" ".join(argv) + "\n")
            out.flush()
            proc = subprocess.run(argv, cwd=self.work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=self.args.timeout)
        return proc.returncode, str(log)

    def train(self, name: str, variant: str, nproc: int, *extra: str, device: str | None = None,
              steps: int | None = None) -> Path | None:
        """A training run of ``variant`` into ``runs/NAME``; its folder, or None (a FAIL row) if it failed."""
        data, overrides = VARIANTS[variant]
        out = self.work / "runs" / name
        sets = [f"train.out_dir={out}", f"train.max_steps={steps or self.steps}", *overrides]
        status, log = self.cli(name, "train", *(a for o in sets for a in ("--set", o)), *extra, nproc=nproc,
                               device=device, data=data)
        if status:
            self.add(name, str(nproc), "FAIL", f"train exited {status}; see {log}", 0.0)
            return None
        return out

    def add(self, check: str, world: str, result: str, detail: str, seconds: float) -> None:
        self.rows.append(Row(check, world, result, detail, round(seconds, 1)))
        print(f"  {result:4}  {check} [{world}] {detail}", flush=True)

    # ---- the checks ----
    def environment(self) -> int:
        """Rows about the stack; the number of processes the multi-process checks use."""
        import torch

        if self.args.cpu:
            self.add("device", "-", "PASS", f"CPU (gloo), torch {torch.__version__}", 0.0)
            return self.args.nproc or 2
        if not torch.cuda.is_available():
            why = "built without CUDA" if torch.version.cuda is None else "no usable GPU (driver, CUDA_VISIBLE_DEVICES)"
            self.add("cuda", "-", "FAIL", f"torch {torch.__version__}: {why}; run DEVICE=cuda bash launch/setup.sh", 0)
            return 0
        count = torch.cuda.device_count()  # honours CUDA_VISIBLE_DEVICES; a MIG slice counts as one device
        self.add("cuda", "-", "PASS", f"torch {torch.__version__} (CUDA {torch.version.cuda}), {count} GPU(s): "
                 f"{torch.cuda.get_device_name(0)}", 0.0)
        try:
            import fbgemm_gpu  # noqa: F401

            lengths = torch.tensor([2, 3], dtype=torch.int32, device="cuda")
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
            assert offsets.tolist() == [0, 2, 5]
            self.add("fbgemm CUDA ops", "-", "PASS", f"fbgemm_gpu {getattr(fbgemm_gpu, '__version__', '?')}", 0.0)
        except Exception as err:  # every failure here means the same: the CUDA fbgemm stack is unusable
            self.add("fbgemm CUDA ops", "-", "FAIL", f"{type(err).__name__}: {err}"[:300], 0.0)
            return 0
        return self.args.nproc or count

    def write_config(self) -> None:
        cfg = {
            "data": {"source": "synthetic", "synthetic": {"num_users": 200, "num_items": 150,
                                                          "interactions_per_user": 20, "num_clusters": 6,
                                                          "seed": 0}},
            "features": {"history_length": 10},
            "model": {"embedding_dim": 16, "mlp_dims": [32], "output_dim": 16},
            "loss": {"temperature": 0.1, "global_negatives": True},
            "train": {"batch_size": 64, "epochs": 50, "val_every_steps": 0, "val_max_users": 200,
                      "checkpoint_every_steps": 0, "log_every_steps": 2, "seed": 0, "progress": False},
            "eval": {"ks": [10, 50], "filter_seen": True, "split": "test"},
        }
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def prepare(self) -> bool:
        ok = True
        for data in DATA_VARIANTS:
            started = time.monotonic()
            status, log = self.cli(f"prepare-{data}", "prepare", device="cpu", data=data)
            if status:
                self.add(f"prepare {data}", "1", "FAIL", f"exited {status}; see {log}", time.monotonic() - started)
                ok = False
        return ok

    def compare(self, check: str, world: str, run: Path | None, reference: Path | None, tolerance: float,
                started: float, steps: slice | None = None) -> None:
        """A row comparing ``run``'s per-step losses with ``reference``'s (every member's for an ensemble)."""
        if run is None or reference is None:
            return  # the failed run already has its row
        try:
            pairs = [(losses(run / m), losses(reference / m)) for m in members(reference)]
        except FileNotFoundError as err:
            self.add(check, world, "FAIL", f"no losses: {err}", time.monotonic() - started)
            return
        worst = 0.0
        for got, want in pairs:
            want = want[steps] if steps is not None else want[:len(got)]
            got = got[-len(want):] if steps is not None else got
            if len(got) != len(want) or not got:
                self.add(check, world, "FAIL", f"{len(got)} losses, expected {len(want)}", time.monotonic() - started)
                return
            worst = max(worst, relative_difference(got, want))
        result = "PASS" if worst <= tolerance else "FAIL"
        self.add(check, world, result, f"max relative loss difference {worst:.2e} (tolerance {tolerance:g})",
                 time.monotonic() - started)

    def run(self) -> int:
        print(f"gpu_check: {'CPU processes (gloo)' if self.args.cpu else 'GPUs (nccl)'}; work folder {self.work}")
        self.write_config()
        nproc = self.environment()
        if not nproc or not self.prepare():
            return self.finish()
        worlds = sorted({1, nproc})
        tolerance = TOLERANCE[self.device]
        references = {}
        for variant in VARIANTS:  # one CPU process, float32, no pipeline: what every run must reproduce
            references[variant] = self.train(f"ref-{variant}", variant, 1, "--set", "train.pipeline=never",
                                             device="cpu", steps=self.steps + 2)
        for world in worlds:
            for variant in VARIANTS:
                started = time.monotonic()
                pipeline = "never" if variant in UNPIPELINED else "always"
                run = self.train(f"{variant}-pipeline-ws{world}", variant, world, "--set", f"train.pipeline={pipeline}")
                self.compare(label(variant), str(world), run, references[variant], tolerance, started)
        self.plans_and_kernels(nproc, references["default"])
        self.after_training(nproc, references["default"])
        return self.finish()

    def plans_and_kernels(self, nproc: int, reference: Path | None) -> None:
        """Row-wise plan, bf16, fused Adam tables and the UVM-caching kernel on the default variant."""
        started = time.monotonic()
        run = self.train(f"row_wise-ws{nproc}", "default", nproc, "--set", "sharding.sharding_types=[row_wise]",
                         "--set", "train.pipeline=always")
        self.compare("row-wise plan (pipeline)", str(nproc), run, reference, TOLERANCE[self.device], started)
        if self.args.quick:
            return
        started = time.monotonic()
        run = self.train(f"bf16-ws{nproc}", "default", nproc, "--set", "train.bf16=true",
                         "--set", "train.pipeline=always")
        self.compare("bf16 autocast (pipeline)", str(nproc), run, reference, TOLERANCE["bf16"], started)
        if self.args.cpu:
            self.add("train.tf32 (pipeline)", str(nproc), "SKIP", "TF32 matrix products: CUDA only", 0.0)
            self.add("fused Adam tables", str(nproc), "SKIP", "fbgemm runs fused Adam on CUDA only", 0.0)
            self.add("UVM-caching kernel", str(nproc), "SKIP", "CUDA unified memory: CUDA only", 0.0)
            return
        started = time.monotonic()
        run = self.train(f"tf32-ws{nproc}", "default", nproc, "--set", "train.tf32=true",
                         "--set", "train.pipeline=always")
        self.compare("train.tf32 (pipeline)", str(nproc), run, reference, TOLERANCE["tf32"], started)
        started = time.monotonic()
        run = self.train(f"adam-ws{nproc}", "default", nproc, "--set", "train.sparse_optimizer=adam")
        if run is not None:
            values = losses(run)
            ok = all(math.isfinite(v) for v in values) and values[-1] < values[0]
            self.add("fused Adam tables", str(nproc), "PASS" if ok else "FAIL",
                     f"losses {values[0]:.4f} -> {values[-1]:.4f} (finite and falling)", time.monotonic() - started)
        started = time.monotonic()
        run = self.train(f"uvm-ws{nproc}", "default", nproc, "--set", "sharding.compute_kernel=fused_uvm_caching",
                         "--set", "sharding.cache_load_factor=0.5")
        self.compare("UVM-caching kernel", str(nproc), run, reference, TOLERANCE[self.device], started)

    def after_training(self, nproc: int, reference: Path | None) -> None:
        """evaluate / export / recommend from the N-process run, and --resume from N processes onto 1."""
        run = self.work / "runs" / f"default-pipeline-ws{nproc}"
        if reference is None or not (run / "checkpoint").is_dir():
            self.add("evaluate / export / resume", str(nproc), "SKIP", "the default run did not train", 0.0)
            return
        metrics = {}
        for name, world, device in (("cpu", 1, "cpu"), ("device", nproc, None)):  # one checkpoint, two ways
            started = time.monotonic()
            out = self.work / f"eval-{name}.json"
            status, log = self.cli(f"evaluate-{name}", "evaluate", "--set", f"train.out_dir={run}",
                                   "--output", str(out), nproc=world, device=device)
            if status:
                self.add("evaluate", str(world), "FAIL", f"exited {status}; see {log}", time.monotonic() - started)
                return
            metrics[name] = json.loads(out.read_text())["model"]
        worst = max(abs(metrics["device"][k] - metrics["cpu"][k]) for k in metrics["cpu"])
        tolerance = 1e-5 if self.args.cpu else 5e-3
        self.add("evaluate (vs 1 CPU process)", str(nproc), "PASS" if worst <= tolerance else "FAIL",
                 f"max metric difference {worst:.2e} (tolerance {tolerance:g})", time.monotonic() - started)
        started = time.monotonic()
        export = self.work / "export"
        status, log = self.cli("export", "export", "--set", f"train.out_dir={run}", "--out", str(export), nproc=nproc)
        self.add("export", str(nproc), "FAIL" if status else "PASS", f"exit {status}; {log}",
                 time.monotonic() - started)
        if not status:
            started = time.monotonic()
            status, log = self.cli("recommend", "recommend", "--export", str(export), "--user", "1", "-k", "5",
                                   "--json", device="cpu")
            items = json.loads(Path(log).read_text().strip().splitlines()[-1])["items"] if status == 0 else []
            self.add("recommend", "1", "PASS" if len(items) == 5 else "FAIL",
                     f"exit {status}, {len(items)} of 5 items; {log}", time.monotonic() - started)
        started = time.monotonic()
        resumed = self.train(f"resume-ws{nproc}-to-1", "default", 1, "--resume", str(run / "last"),
                             steps=self.steps + 2)
        self.compare(f"--resume from {nproc} to 1", "1", resumed, reference, TOLERANCE[self.device], started,
                     steps=slice(self.steps, self.steps + 2))

    def finish(self) -> int:
        table = [("check", "world", "result", "detail")] + [(r.check, r.world, r.result, r.detail) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        print()
        for row in table:
            print("  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row)))
        failed = [r for r in self.rows if r.result == "FAIL"]
        summary = {"device": self.device, "quick": self.args.quick, "passed": not failed and bool(self.rows),
                   "rows": [asdict(r) for r in self.rows]}
        out = Path(self.args.json) if self.args.json else self.work / "gpu_check.json"
        out.write_text(json.dumps(summary, indent=2))
        verdict = "PASS" if summary["passed"] else f"FAIL ({len(failed)} check(s); logs under {self.work / 'logs'})"
        print(f"\ngpu_check: {verdict}; table in {out}")
        return 0 if summary["passed"] else 1


def losses(out: Path) -> list[float]:
    return json.loads((out / "train_metrics.json").read_text())["losses"]


def members(out: Path) -> list[str]:
    """The folders holding per-step losses: the run itself, or each ensemble member's."""
    found = sorted(p.name for p in out.glob("member*") if (p / "train_metrics.json").is_file())
    return found or [""]


def relative_difference(got: list[float], want: list[float]) -> float:
    """max |got - want| / max |want| (inf when a value is not finite)."""
    if not all(math.isfinite(v) for v in [*got, *want]):
        return math.inf
    scale = max(max(abs(v) for v in want), 1e-12)
    return max(abs(a - b) for a, b in zip(got, want)) / scale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/gpu_check.sh",
        description="Self-test of the GPU path on a tiny synthetic job: every model variant with the pipeline, "
                    "at 1 process and at every visible GPU, against one CPU process in float32; bf16, fused Adam, "
                    "UVM caching, a row-wise plan; evaluate, export, recommend, resume N -> 1. Prints a "
                    "PASS/FAIL/SKIP table and exits 1 if any check failed.")
    parser.add_argument("--cpu", action="store_true", help="run the checks on CPU processes (gloo) instead of GPUs")
    parser.add_argument("--quick", action="store_true",
                        help="leave out bf16, fused Adam and UVM caching (what `make test` runs with --cpu)")
    parser.add_argument("--nproc", type=int, default=0,
                        help="processes for the multi-process checks (default: every visible GPU; 2 with --cpu)")
    parser.add_argument("--steps", type=int, default=4, help="training steps compared per run (default 4)")
    parser.add_argument("--work", default="runs/gpu_check", help="folder for data, runs and logs")
    parser.add_argument("--json", default="", help="where to write the table as JSON (default WORK/gpu_check.json)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one command may take")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(Check(parse_args()).run())
