"""Start-up and memory of one 8-GPU node at full scale, on CPU: 8 ranks under torchrun (gloo)
open the same synthetic 350M-row index of benchmarks/samplers.py, build the same
cluster_stratified sampler (strata shared through the index's .sampler_cache), feed a
DataLoader with workers through StepBatchSampler, and take one DDP step of a tiny model.

Measured: seconds from launch (before torchrun) to every rank holding its first batch
(limit 60 s), and the PSS of the 8 ranks plus their DataLoader workers at that moment,
read from /proc/PID/smaps_rollup (shared pages counted once; limit 8 GB, the model
excluded: here it is a 2-layer MLP of a few KB). Run cold (the strata cache removed: one
rank builds, the others wait and map it) and warm (the cache present, as every later job).

    flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/startup_8ranks.py        # 350M rows
    .venv/bin/python benchmarks/startup_8ranks.py --rows 1000000 --ranks 2                # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from samplers import MemmapIndex, make_synthetic  # noqa: E402  (the benchmark's synthetic index)

FIRST_BATCH_LIMIT_S = 60.0
PSS_LIMIT_GB = 8.0
GLOBAL_BATCH = 2048


class CachedMemmapIndex(MemmapIndex):
    """The synthetic index with a directory, so the sampler caches its strata there as for a TileIndex."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.path = root


class RowDataset:
    """Reads each key's row from the memory-mapped index columns (what a tile dataset touches
    before it decodes pixels); a few bytes per sample, so the figures are the index's and the
    sampler's, not image buffers'."""

    def __init__(self, index: MemmapIndex):
        self.index = index
        self._levels = None

    def __getitem__(self, key: tuple[int, int, int]):
        import torch

        if self._levels is None:  # opened in the worker, after the fork
            self._levels = [self.index.level(k) for k in range(1, self.index.num_levels + 1)]
        row = key[2]
        return torch.tensor([float(level[row]) for level in self._levels])


def pss_gb(pids: list[int]) -> dict[str, float]:
    """The processes' proportional set size (each shared page split among its sharers), in all
    and its anonymous (heap, copied-on-write) and file-backed (memory-mapped index, libraries) parts."""
    total_kb = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0}
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in total_kb:
                total_kb[name] += int(value.split()[0])
    return {name: kb / 2**20 for name, kb in total_kb.items()}


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_main(root: Path, level: int, workers: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from dinov2_patho.samplers import StepBatchSampler, build_sampler

    launched = float(os.environ["STARTUP_LAUNCHED"])
    marks = {"imported": time.time() - launched}
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    marks["process_group"] = time.time() - launched
    index = CachedMemmapIndex(root)
    sampler = build_sampler({"name": "cluster_stratified", "level": level}, index, GLOBAL_BATCH)
    marks["sampler_built"] = time.time() - launched
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(index.num_levels, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)))
    loader = DataLoader(RowDataset(index), batch_sampler=StepBatchSampler(sampler, rank, world),
                        num_workers=workers)
    batch = next(iter_loader := iter(loader))
    marks["first_batch"] = time.time() - launched
    model(batch).mean().backward()  # one DDP step: gloo all-reduce of the gradients
    marks["first_step"] = time.time() - launched
    me = [os.getpid(), *children(os.getpid())]  # this rank and its DataLoader workers
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "pids": me, "marks": marks,
                                      "strata_mapped": isinstance(sampler.strata.order, np.memmap)})
    if rank == 0:  # every rank is alive and holds its batch: measure them all together
        pids = [p for g in gathered for p in g["pids"]]
        ranks_only = [g["pids"][0] for g in gathered]
        out.write_text(json.dumps({"ranks": gathered, "pss_gb": pss_gb(pids),
                                   "pss_ranks_gb": pss_gb(ranks_only), "processes": len(pids)}))
    dist.barrier()
    del iter_loader
    dist.destroy_process_group()


def run_node(root: Path, ranks: int, level: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="startup8_") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "STARTUP_LAUNCHED": repr(time.time()), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               __file__, "--rank-worker", str(root), str(level), str(workers), str(out)]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def report(label: str, r: dict) -> None:
    first = max(g["marks"]["first_batch"] for g in r["ranks"])
    built = max(g["marks"]["sampler_built"] for g in r["ranks"])
    imported = max(g["marks"]["imported"] for g in r["ranks"])
    mapped = all(g["strata_mapped"] for g in r["ranks"])
    pss = r["pss_gb"]
    print(f"  {label}: first batch on every rank {first:6.1f} s ({first / FIRST_BATCH_LIMIT_S:4.2f}x limit "
          f"{FIRST_BATCH_LIMIT_S:.0f} s; imports done {imported:.1f} s, sampler built {built:.1f} s)")
    print(f"  {label}: PSS of {len(r['ranks'])} ranks + workers ({r['processes']} processes) "
          f"{pss['Pss']:5.2f} GB ({pss['Pss'] / PSS_LIMIT_GB:4.2f}x limit {PSS_LIMIT_GB:.0f} GB; "
          f"anonymous {pss['Pss_Anon']:.2f}, file-backed {pss['Pss_File']:.2f}); "
          f"ranks alone {r['pss_ranks_gb']['Pss']:.2f} GB; strata memory-mapped on every rank: {mapped}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=349_664_180)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--level", type=int, default=4, help="tree level stratified (4: K=62)")
    parser.add_argument("--workdir", default="/tmp/dinov2_patho_bench_samplers")
    parser.add_argument("--warm-only", action="store_true", help="keep the strata cache: no cold run")
    parser.add_argument("--rank-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        root, level, workers, out = args.rank_worker
        rank_main(Path(root), int(level), int(workers), Path(out))
        return
    t0 = time.perf_counter()
    root = make_synthetic(args.rows, Path(args.workdir) / f"rows{args.rows}")
    print(f"{args.rows:,} rows at {root} ({time.perf_counter() - t0:.0f} s to generate or find); "
          f"{args.ranks} ranks x {args.workers} workers, cluster_stratified level {args.level}, "
          f"global batch {GLOBAL_BATCH}, {os.cpu_count()} CPUs")
    if not args.warm_only:
        shutil.rmtree(root / ".sampler_cache", ignore_errors=True)
        report("cold (strata built by one rank)", run_node(root, args.ranks, args.level, args.workers))
        cached = list((root / ".sampler_cache").iterdir())
        print(f"  strata cache entries after {args.ranks} ranks: {len(cached)}")
    report("warm (strata cache present)", run_node(root, args.ranks, args.level, args.workers))


if __name__ == "__main__":
    main()
