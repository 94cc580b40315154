"""Sampler throughput, build time and peak memory at TCGA+GTEx scale; and against the paper's generator.

A synthetic 4-level tree (100,000 / 10,000 / 350 / 62 clusters, finest first, nested,
with skewed sizes and slide-correlated clusters) is laid over the real per-slide tile
counts of ../shared/data/tiles_per_slide.csv, scaled to the row count asked for, as
memory-mapped columns under --workdir. Each measurement runs in a fresh process so its
peak RSS (file-backed pages of the memory-mapped index included) is its own.

(a) build time, samples/s and peak RSS for cluster_stratified at K = 62, 350, 10,000,
    100,000 (and uniform), B = 2048, at 35M and 350M rows. Limits: >= 2M samples/s,
    build <= 60 s, peak RSS <= 4 GB at 350M.
(b) the paper's released schedule generator (swiss-ai/patho-ssl-data-curation,
    batch_stratification/generate_schedules_stratified_clean.py; give its path with
    --reference and a Python with pandas with --reference-python; the missing comma is
    restored in a temporary copy) against ours on the same 1M-tile input: level 4 and 3,
    800 slides per 350,000-sample pseudo-epoch.
(c) --metadata: the `metadata` baseline (inverse-frequency subset, 10% target, uniform batches)
    over the real 37,096 slides (tissue_diagnosis of ../shared/data TCGA_/GTEx_tissue_metadata.csv,
    tiles_per_slide.csv counts) at 350M rows (limits: build <= 10 s, peak RSS <= 1 GB); and against
    the paper's metadata_based_sampling.py (--metadata-reference; pandas; matplotlib stubbed: plots
    only) at --metadata-fractions of the rows (it ran out of memory at full scale): per-class
    weights and rows drawn per class.

    .venv/bin/python benchmarks/samplers.py --quick                      # 1M and 5M rows, no reference
    flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/samplers.py --reference ... \\
        --reference-python ...
    flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/samplers.py --metadata \\
        --metadata-reference .../metadata_based_sampling.py --reference-python ...
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LEVELS = (100_000, 10_000, 350, 62)  # level_1 (finest) .. level_4
DTYPES = (np.uint32, np.uint16, np.uint16, np.uint8)
CHUNK = 1 << 23
B = 2048


class MemmapIndex:
    """The TileIndex interface over the benchmark's memory-mapped columns (a full index)."""

    def __init__(self, root: Path):
        meta = json.loads((root / "meta.json").read_text())
        self.root, self.n = root, meta["rows"]
        self.num_levels = len(LEVELS)
        self.slide_names = [f"slide{i}" for i in range(meta["slides"])]
        self.path = None  # no strata cache: every build is cold
        self.is_view = False

    def __len__(self) -> int:
        return self.n

    def level(self, k: int) -> np.ndarray:
        return np.load(self.root / f"level_{k}.npy", mmap_mode="r")

    def num_clusters(self, k: int) -> int:
        return LEVELS[k - 1]

    def slides(self, positions) -> np.ndarray:
        return np.asarray(np.load(self.root / "slides.npy", mmap_mode="r")[positions])

    # the metadata sampler's interface, over the grouped layout of (c) (slide ranges in offsets.npy)
    def slide_runs(self) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.root / "offsets.npy"
        if not path.is_file():
            return None
        offsets = np.load(path)
        return offsets[:-1], np.diff(offsets)

    def slide_metadata(self, csv_path: str, column: str) -> tuple[np.ndarray, list[str]]:
        with open(csv_path, newline="") as f:
            value = dict(csv.reader(f))
        names = sorted(set(value.values()) - {column})
        code = {v: i for i, v in enumerate(names)}
        return np.array([code[value[s]] for s in self.slide_names], np.int32), names

    def metadata_codes(self, csv_path: str, column: str) -> tuple[np.ndarray, list[str]]:
        """As TileIndex.metadata_codes (narrow codes filled in chunks); no TileIndex is built at 350M."""
        per_slide, names = self.slide_metadata(csv_path, column)
        per_slide = per_slide.astype(np.min_scalar_type(-len(names)))
        out = np.empty(self.n, per_slide.dtype)
        for a in range(0, self.n, CHUNK):
            out[a:a + CHUNK] = per_slide[self.slides(slice(a, a + CHUNK))]
        return out, names


def per_slide_counts(rows: int) -> np.ndarray:
    counts = np.loadtxt(DATA / "tiles_per_slide.csv", delimiter=",", skiprows=1, usecols=1, dtype=np.int64)
    if rows >= counts.sum():
        return counts
    scaled = np.floor(counts * (rows / counts.sum())).astype(np.int64)
    scaled[: rows - scaled.sum()] += 1  # exact total
    return scaled


def make_synthetic(rows: int, root: Path) -> Path:
    if (root / "meta.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    counts = per_slide_counts(rows)
    n = int(counts.sum())
    rng = np.random.default_rng(0)
    # nested tree: each level-k cluster has a parent at level k+1
    parents = [rng.integers(0, LEVELS[k + 1], LEVELS[k]) for k in range(3)]
    home = rng.integers(0, LEVELS[0], len(counts))  # clusters correlate with slides
    cols = {f"level_{k + 1}": np.lib.format.open_memmap(root / f"level_{k + 1}.npy", "w+", DTYPES[k], (n,))
            for k in range(4)}
    slides = np.lib.format.open_memmap(root / "slides.npy", "w+", np.int32, (n,))
    bounds = np.r_[0, np.cumsum(counts)]
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        slide = np.searchsorted(bounds, np.arange(a, b), side="right") - 1
        slides[a:b] = slide
        # skewed sizes: most tiles near the slide's home cluster, a long tail elsewhere
        fine = (home[slide] + (rng.random(b - a) ** 4 * LEVELS[0]).astype(np.int64)) % LEVELS[0]
        for k in range(4):
            cols[f"level_{k + 1}"][a:b] = fine
            if k < 3:
                fine = parents[k][fine]
    for col in (*cols.values(), slides):
        col.flush()
    (root / "meta.json").write_text(json.dumps({"rows": n, "slides": len(counts)}))
    return root


def make_metadata_input(rows: int, root: Path) -> Path:
    """slides.npy and offsets.npy (tiles_per_slide.csv counts scaled to `rows`, slide i = its line i,
    grouped by slide as an ingested index), a constant
    level_4 (read by the uniform sampler's telemetry), metadata.csv (slide{i},tissue_diagnosis) and,
    for the reference, reference.csv (real slide_id,tissue_diagnosis,num_tiles scaled)."""
    if (root / "offsets.npy").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    ids = np.loadtxt(DATA / "tiles_per_slide.csv", delimiter=",", skiprows=1, usecols=0, dtype=str)
    counts = per_slide_counts(rows)
    n = int(counts.sum())
    slides = np.lib.format.open_memmap(root / "slides.npy", "w+", np.int32, (n,))
    for s, (a, b) in enumerate(zip(np.r_[0, np.cumsum(counts)[:-1]], np.cumsum(counts))):
        slides[a:b] = s
    slides.flush()
    np.save(root / "offsets.npy", np.r_[0, np.cumsum(counts)])
    np.lib.format.open_memmap(root / "level_4.npy", "w+", np.uint8, (n,)).flush()
    value = {}
    for name in ("TCGA_tissue_metadata.csv", "GTEx_tissue_metadata.csv"):
        with open(DATA / name, newline="") as f:
            value.update((r["slide_id"], r["tissue_diagnosis"]) for r in csv.DictReader(f))
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "tissue_diagnosis"),
                                 *((f"slide{i}", value[s]) for i, s in enumerate(ids))])
    with open(root / "reference.csv", "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "tissue_diagnosis", "num_tiles"),
                                 *((s, value[s], c) for s, c in zip(ids, counts.tolist()))])
    (root / "meta.json").write_text(json.dumps({"rows": n, "slides": len(counts)}))
    return root


def peak_rss_gb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: after fork + exec the latter also
    counts the parent's peak (here, the generator of the memory-mapped index)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(root: Path, cfg: dict, batches: int) -> dict:
    """In this (fresh) process: build a sampler, then time `batches` batches."""
    from dinov2_patho.samplers import build_sampler

    index = MemmapIndex(root)
    base_rss = peak_rss_gb()
    t0 = time.perf_counter()
    sampler = build_sampler(cfg, index, B)
    build_s = time.perf_counter() - t0
    sampler.next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        sampler.next_batch()
    per_s = batches * B / (time.perf_counter() - t0)
    return {"build_s": build_s, "samples_per_s": per_s, "peak_rss_gb": peak_rss_gb(),
            "import_rss_gb": base_rss}


REFERENCE_DRIVER = """
import importlib.util, json, sys, time
import numpy as np, random
spec = importlib.util.spec_from_file_location("ref", sys.argv[1]); ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
csv, out, level, budget_s = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
np.random.seed(0); random.seed(0)
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**20
base = hwm()
t0 = time.perf_counter()
samplers = ref.get_cluster2tile_sampler(csv, out, "adaptive_step", int(level))
build_s = time.perf_counter() - t0
quota = ref.assign_num_tiles_per_cluster_in_batch(2048, len(samplers))
open_slides, n, t0 = set(), 0, time.perf_counter()
while time.perf_counter() - t0 < budget_s and n < 171:   # one 350,000-sample pseudo-epoch at most
    batch, open_slides = ref.create_batch(quota, open_slides, samplers, 800)
    n += 1
dt = time.perf_counter() - t0
print(json.dumps({"build_s": build_s, "samples_per_s": n * 2048 / dt, "batches": n,
                  "peak_rss_gb": hwm(),
                  "import_rss_gb": base, "open_slides": len(open_slides)}))
"""


def run_reference(reference: Path, python: str, root: Path, level: int, budget_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="patho_ref_") as tmp:
        tmp = Path(tmp)
        source = reference.read_text()
        broken = 'choices=["t1","t2"]\n'
        if broken not in source:
            raise SystemExit(f"{reference}: the known syntax error is not there; is this the released file?")
        (tmp / "ref.py").write_text(source.replace(broken, 'choices=["t1","t2"],\n'))
        (tmp / "driver.py").write_text(REFERENCE_DRIVER)
        csv = tmp / "tiles.csv"
        from dinov2_patho.data.index import TileIndex

        index = MemmapIndex(root)
        slides = index.slides(TileIndex.ALL)  # the reference reads a CSV of every row anyway
        tile_idx = np.arange(len(slides)) - np.searchsorted(slides, slides)  # tile number within slide
        with open(csv, "w") as f:
            f.write(f"slide_id,tile_idx,level_{level}\n")
            lab = np.asarray(index.level(level))
            for s, t, c in zip(slides.tolist(), tile_idx.tolist(), lab.tolist()):
                f.write(f"slide{s},{t},{c}\n")
        (tmp / "out").mkdir()
        command = [python, str(tmp / "driver.py"), str(tmp / "ref.py"), str(csv), str(tmp / "out"),
                   str(level), str(budget_s)]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])


METADATA_DRIVER = """
import importlib.util, json, sys, time, types
plt = types.ModuleType("matplotlib.pyplot")  # the script plots at import; plots are not measured
sys.modules["matplotlib"] = types.ModuleType("matplotlib"); sys.modules["matplotlib.pyplot"] = plt
sys.modules["matplotlib"].pyplot = plt
spec = importlib.util.spec_from_file_location("ref", sys.argv[1]); ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**20
t0 = time.perf_counter()
df = ref.calculate_sampling_weights(ref.load_and_merge_metadata([sys.argv[2]]))
try:
    drawn, how = df.sample(n=int(sys.argv[3]), random_state=25, weights="sampling_weight"), "DataFrame.sample"
except ValueError:  # recent pandas refuses weights that saturate a class; older pandas drew with numpy:
    import numpy as np
    w = df["sampling_weight"].to_numpy()
    pick = np.random.RandomState(25).choice(len(df), int(sys.argv[3]), replace=False, p=w / w.sum())
    drawn, how = df.iloc[pick], "RandomState.choice, older pandas' draw"
seconds = time.perf_counter() - t0
weights = df.groupby("tissue_diagnosis")["sampling_weight"].first()
print(json.dumps({"s": seconds, "peak_rss_gb": hwm(), "how": how,
                  "weights": {k: float(v) for k, v in weights.items()},
                  "drawn": {k: int(v) for k, v in drawn.groupby("tissue_diagnosis").size().items()}}))
"""


def metadata_vs_reference(reference: Path, python: str, root: Path) -> str:
    """Per-class weights (max class size / class size, the reference's) and rows drawn per class."""
    from dinov2_patho.samplers.metadata import inverse_frequency_subset_of_runs

    index = MemmapIndex(root)
    target = len(index) // 10
    with tempfile.TemporaryDirectory(prefix="patho_meta_ref_") as tmp:
        (Path(tmp) / "driver.py").write_text(METADATA_DRIVER)
        command = [python, str(Path(tmp) / "driver.py"), str(reference), str(root / "reference.csv"),
                   str(target)]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    codes, names = index.metadata_codes(str(root / "metadata.csv"), "tissue_diagnosis")
    per_slide, _ = index.slide_metadata(str(root / "metadata.csv"), "tissue_diagnosis")
    t0 = time.perf_counter()
    subset = inverse_frequency_subset_of_runs(per_slide, *index.slide_runs(), target, 25)
    drawn = np.bincount(codes[subset], minlength=len(names))
    seconds = time.perf_counter() - t0
    freq = np.bincount(codes, minlength=len(names))
    ours = dict(zip(names, (freq.max() / freq).tolist()))
    same = set(ours) == set(ref["weights"])
    weight_err = max(abs(ours[k] / ref["weights"][k] - 1) for k in names) if same else float("inf")
    theirs = np.array([ref["drawn"].get(k, 0) for k in names])
    tv = 0.5 * np.abs(drawn - theirs).sum() / target
    return (f"{len(index):,} rows, {len(names)} classes, target {target:,}: per-class weights max relative "
            f"difference {weight_err:.1e}; rows drawn per class: total variation ours vs reference {tv:.4f} "
            f"(largest class gap {np.abs(drawn - theirs).max():,} rows); reference {ref['s']:.1f} s, "
            f"peak RSS {ref['peak_rss_gb']:.2f} GB ({ref['how']}); "
            f"ours (subset only, in-process) {seconds:.1f} s")


def child(root: Path, cfg: dict, batches: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", str(root), json.dumps(cfg), str(batches)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1M and 5M rows only, no reference run")
    parser.add_argument("--scales", default="35000000,349664180", help="row counts for (a)")
    parser.add_argument("--workdir", default="/tmp/dinov2_patho_bench_samplers")
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--reference", type=Path, help="path of generate_schedules_stratified_clean.py")
    parser.add_argument("--reference-python", default=sys.executable)
    parser.add_argument("--reference-seconds", type=float, default=120.0)
    parser.add_argument("--reference-levels", default="4,3", help="tree levels compared in (b)")
    parser.add_argument("--skip-a", action="store_true", help="run (b) only")
    parser.add_argument("--metadata", action="store_true", help="run (c), the metadata baseline, only")
    parser.add_argument("--metadata-rows", type=int, default=349_664_180)
    parser.add_argument("--metadata-reference", type=Path, help="path of metadata_based_sampling.py")
    parser.add_argument("--metadata-fractions", default="0.01,0.05",
                        help="fractions of the rows the reference runs on")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), json.loads(args.measure[1]), int(args.measure[2]))))
        return
    workdir = Path(args.workdir)
    if args.metadata:
        metadata_section(args, workdir)
        return
    scales = [1_000_000, 5_000_000] if args.quick else [int(s) for s in args.scales.split(",")]
    strat = {"name": "cluster_stratified", "cache": False}
    configs = [(f"cluster_stratified K={LEVELS[k - 1]}", {**strat, "level": k}) for k in (4, 3, 2, 1)]
    configs += [("cluster_stratified K=62 cap=800", {**strat, "level": 4, "max_slides_per_epoch": 800}),
                ("cluster_stratified K=62 alpha=0.5", {**strat, "level": 4, "alpha": 0.5}),
                ("uniform", {"name": "uniform"})]
    print(f"(a) B={B}; limits at 350M: >= 2.0M samples/s, build <= 60 s, peak RSS <= 4 GB")
    for rows in [] if args.skip_a else scales:
        t0 = time.perf_counter()
        root = make_synthetic(rows, workdir / f"rows{rows}")
        print(f"  {rows:,} rows ({time.perf_counter() - t0:.0f} s to generate or find the synthetic index)")
        for name, cfg in configs:
            r = child(root, cfg, args.batches)
            print(f"  {rows / 1e6:6.0f}M  {name:36s} build {r['build_s']:6.1f} s "
                  f"({r['build_s'] / 60:4.2f}x limit)  "
                  f"{r['samples_per_s'] / 1e6:6.2f} M samples/s ({r['samples_per_s'] / 2e6:5.2f}x target)  "
                  f"peak RSS {r['peak_rss_gb']:5.2f} GB ({r['peak_rss_gb'] / 4:4.2f}x limit; "
                  f"{r['import_rss_gb']:.2f} GB after imports)", flush=True)
    if args.reference is None:
        return
    print("(b) vs the paper's generate_schedules_stratified_clean.py, same 1M-tile input, B=2048, "
          "800 slides per 350,000-sample pseudo-epoch")
    root = make_synthetic(1_000_000, workdir / "rows1000000")
    for level in (int(v) for v in args.reference_levels.split(",")):
        ref = run_reference(args.reference, args.reference_python, root, level, args.reference_seconds)
        ours = child(root, {"name": "cluster_stratified", "level": level, "cache": False,
                            "max_slides_per_epoch": 800, "pseudo_epoch_samples": 350_000}, args.batches)
        print(f"  level {level} (K={LEVELS[level - 1]}): reference build {ref['build_s']:.1f} s, "
              f"{ref['samples_per_s']:,.0f} samples/s over {ref['batches']} batches, peak RSS "
              f"{ref['peak_rss_gb']:.2f} GB ({ref['import_rss_gb']:.2f} after imports; "
              f"{ref['open_slides']} slides opened in the pseudo-epoch, cap 800)")
        print(f"  level {level} (K={LEVELS[level - 1]}): ours      build {ours['build_s']:.1f} s, "
              f"{ours['samples_per_s']:,.0f} samples/s, peak RSS {ours['peak_rss_gb']:.2f} GB "
              f"({ours['import_rss_gb']:.2f} after imports)")
        speed = ours["samples_per_s"] / ref["samples_per_s"]
        print(f"  level {level}: samples/s ratio ours/reference {speed:,.0f}x; "
              f"build ratio reference/ours {ref['build_s'] / ours['build_s']:.1f}x; "
              f"peak RSS ratio reference/ours {ref['peak_rss_gb'] / ours['peak_rss_gb']:.2f}x", flush=True)


def metadata_section(args: argparse.Namespace, workdir: Path) -> None:
    print(f"(c) metadata baseline, 10% target, B={B}; limits at full scale: build <= 10 s, peak RSS <= 1 GB")
    root = make_metadata_input(args.metadata_rows, workdir / f"meta{args.metadata_rows}")
    cfg = {"name": "metadata", "metadata_csv": str(root / "metadata.csv"),
           "target_size": args.metadata_rows // 10, "seed": 25}
    r = child(root, cfg, args.batches)
    print(f"  {args.metadata_rows / 1e6:.0f}M  build {r['build_s']:6.1f} s ({r['build_s'] / 10:4.2f}x limit) "
          f"{r['samples_per_s'] / 1e6:6.2f} M samples/s  peak RSS {r['peak_rss_gb']:5.2f} GB "
          f"({r['peak_rss_gb']:4.2f}x limit; {r['import_rss_gb']:.2f} GB after imports)", flush=True)
    fractions = args.metadata_fractions.split(",")
    for fraction in [] if args.metadata_reference is None else map(float, fractions):
        rows = int(args.metadata_rows * fraction)
        root = make_metadata_input(rows, workdir / f"meta{rows}")
        vs = metadata_vs_reference(args.metadata_reference, args.reference_python, root)
        print(f"  {fraction:.0%}: {vs}", flush=True)


if __name__ == "__main__":
    main()
