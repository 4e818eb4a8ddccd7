"""Which engine out-of-core ``prepare`` is built on: DuckDB, Polars streaming or Arrow.

    .venv/bin/python benchmarks/bench_prepare_engines.py --input /work/scale_data/s1e7/interactions \
        --memory-limit 1GB --polars-python /tmp/plv/bin/python

Each engine runs the core of ``prepare`` on a directory of Parquet files in a fresh process:
number the rows in file order, keep each (user, item) pair's first event by (time, file
order), sort by (user, time, file order) and write user, item, timestamp to one Parquet file.
DuckDB gets ``--memory-limit`` (it spills past it); Polars runs its streaming engine (it has
no memory limit to set); Arrow has no out-of-core sort, so it sorts in memory with
``Table.sort_by`` (its datasets stream reads and writes, not sorts). Wall time and peak RSS of
each process, engines alternated over ``--repeats`` rounds, medians reported. Polars is not a
dependency of the package: ``--polars-python`` names an interpreter that has it.
Writes benchmarks/results/prepare_engines.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

DUCKDB = r"""
import sys, duckdb, pyarrow.parquet as pq
from pathlib import Path
files = sorted(str(p) for p in Path(sys.argv[1]).glob("*.parquet"))
con = duckdb.connect()
con.execute(f"SET memory_limit='{sys.argv[3]}'"); con.execute("SET threads=2")
con.execute(f"SET temp_directory='{sys.argv[4]}'"); con.execute("SET preserve_insertion_order=false")
offsets, total = [], 0
for f in files:
    offsets.append((f, total)); total += pq.ParquetFile(f).metadata.num_rows
con.execute("CREATE TEMP TABLE file_start(filename VARCHAR, start BIGINT)")
con.executemany("INSERT INTO file_start VALUES (?, ?)", offsets)
con.execute(f'''COPY (
  WITH raw AS (SELECT r.user, r.item, r.timestamp, f.start + r.file_row_number AS pos
               FROM read_parquet({files!r}, filename=true, file_row_number=true) r JOIN file_start f USING (filename)),
  first AS (SELECT user, item, min({{'t': timestamp, 'p': pos}}) AS f FROM raw GROUP BY user, item)
  SELECT user, item, f.t AS timestamp FROM first ORDER BY user, f.t, f.p) TO '{sys.argv[2]}' (FORMAT parquet)''')
"""

POLARS = r"""
import sys, polars as pl
from pathlib import Path
files = sorted(str(p) for p in Path(sys.argv[1]).glob("*.parquet"))
(pl.scan_parquet(files, row_index_name="pos")
   .sort(["user", "timestamp", "pos"])
   .unique(subset=["user", "item"], keep="first", maintain_order=True)
   .select(["user", "item", "timestamp"])
   .sink_parquet(sys.argv[2]))
"""

ARROW = r"""
import sys, pyarrow as pa, pyarrow.compute as pc, pyarrow.dataset as ds, pyarrow.parquet as pq
from pathlib import Path
files = sorted(str(p) for p in Path(sys.argv[1]).glob("*.parquet"))
table = ds.dataset(files).to_table(columns=["user", "item", "timestamp"])
table = table.append_column("pos", pa.array(range(table.num_rows), pa.int64()))
table = table.sort_by([("user", "ascending"), ("timestamp", "ascending"), ("pos", "ascending")])
first = table.group_by(["user", "item"], use_threads=False).aggregate([("pos", "min")])
keep = pc.is_in(table["pos"], first["pos_min"])
pq.write_table(table.filter(keep).select(["user", "item", "timestamp"]), sys.argv[2])
"""


def run(python: str, code: str, args: list[str]) -> dict:
    """Wall seconds and peak RSS (GiB, from /usr/bin/time) of one engine in a fresh process."""
    started = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", python, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"engine failed:\n{out.stderr}")
    wall = time.perf_counter() - started
    return {"seconds": wall, "peak_rss_gib": int(out.stderr.strip().splitlines()[-1]) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a directory of Parquet files (user, item, timestamp)")
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB's memory_limit")
    parser.add_argument("--polars-python", default=sys.executable)
    parser.add_argument("--engines", default="duckdb,polars,arrow")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "prepare_engines.json"))
    args = parser.parse_args()
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory(dir=Path(args.input).parent) as tmp:
        for _ in range(args.repeats):
            for engine in engines:
                target = str(Path(tmp) / f"{engine}.parquet")
                if engine == "duckdb":
                    result = run(sys.executable, DUCKDB, [args.input, target, args.memory_limit, str(Path(tmp) / "spill")])
                elif engine == "polars":
                    result = run(args.polars_python, POLARS, [args.input, target])
                else:
                    result = run(sys.executable, ARROW, [args.input, target])
                runs[engine].append(result)
                print(f"{engine}: {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    rows = []
    print(f"\n| engine | wall s (median of {args.repeats}) | peak RSS GiB (median) |\n|---|---|---|")
    for engine in engines:
        seconds = statistics.median(r["seconds"] for r in runs[engine])
        peak = statistics.median(r["peak_rss_gib"] for r in runs[engine])
        rows.append({"engine": engine, "seconds": seconds, "peak_rss_gib": peak, "runs": runs[engine]})
        print(f"| {engine} | {seconds:.1f} | {peak:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "input": args.input, "memory_limit": args.memory_limit, "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
