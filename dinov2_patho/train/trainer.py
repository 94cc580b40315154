"""DINOv2 pretraining: one optimizer step per iteration, resumable exactly.

`run_training(cfg, output_dir)` is the whole job (the CLI and the SLURM job call it). It
joins torch.distributed from env:// when WORLD_SIZE > 1, resumes from
`output_dir/checkpoints/latest` when there is one, and stops early, after a checkpoint,
when `request_stop()` was called (a signal handler's job: SIGTERM / SIGUSR2 preemption).
`train.distributed`: ddp (every rank holds the whole model) or fsdp (sharded, `train/fsdp.py`);
checkpoints have the same full format under both.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dinov2_patho.config_files import ConfigError, read_yaml, save_config, to_container
from dinov2_patho.data.augment import MultiCropAugmentation
from dinov2_patho.data.dataset import TileDataset, build_tile_source
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.preflight import PreflightError, describe, preflight_slides
from dinov2_patho.data.readers import SlideTileSource
from dinov2_patho.dirlock import exclusive_directory
from dinov2_patho.distributed import DistContext, broadcast_object, distributed_context, ranks_agree
from dinov2_patho.errors import UserError
from dinov2_patho.eval import run_benchmarks
from dinov2_patho.eval.slide import runner as slide_runner
from dinov2_patho.logging import get_logger, setup_logging
from dinov2_patho.models.student import build_student_backbone
from dinov2_patho.samplers import StepBatchSampler, build_sampler, subset_view
from dinov2_patho.train import checkpoint as ckpt
from dinov2_patho.train import fsdp
from dinov2_patho.train.config import global_batch_size, validate_config
from dinov2_patho.train.config_values import check_resume_config, config_changes
from dinov2_patho.train.data import SeededAugmentDataset, build_collate, build_loader, derived_seed
from dinov2_patho.train.flops import counted, peak_flops, utilisation
from dinov2_patho.train.metrics_log import METRICS_FILE, MetricsWriter, read_metrics
from dinov2_patho.train.optim import apply_schedule, build_optimizer
from dinov2_patho.train.schedules import Schedules
from dinov2_patho.train.ssl_meta_arch import SSLMetaArch, autocast_dtype, unwrap
from dinov2_patho.train.state import ModelState, OptimizerState, SamplerState, ScalerState

log = get_logger(__name__)

_STOP = threading.Event()
_RNG_STREAM = 2  # derived_seed stream of the per-rank model RNG (drop path, ...)


class UnreadableSlidesError(UserError):
    """More tiles than data.max_skipped were unreadable (and substituted): the run stops."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite: the run stops before the bad step is applied."""


def request_stop() -> None:
    """Ask a running `run_training` to write a checkpoint and return at the next iteration
    boundary. Safe from a signal handler; any rank's request stops every rank."""
    _STOP.set()


def install_stop_handlers(signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR2)) -> None:
    """Make `signals` call `request_stop()` (main thread only)."""
    for sig in signals:
        signal.signal(sig, lambda *_: request_stop())


def run_training(cfg: DictConfig, output_dir: str | Path, *, force_resume: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Train per `cfg` into `output_dir`. Returns a summary: "iteration" (completed
    iterations), "start_iteration" (where this call began), "losses" (the last iteration's,
    averaged over ranks), "checkpoint" (the latest checkpoint's path), "stopped" (True when
    stopped early by `request_stop`), "output_dir", "metrics" (metrics.jsonl), "seconds".
    Resuming under a config that differs from the checkpoint's in a key that breaks exact
    resume is refused unless `force_resume`. `progress`: the slide preflight's bar."""
    output_dir = Path(output_dir)
    validate_config(cfg)
    with distributed_context(str(cfg.train.device)) as ctx, exclusive_directory(output_dir, "train", ctx):
        setup_logging(output_dir, rank=ctx.rank)
        trainer = Trainer(cfg, output_dir, ctx, force_resume=force_resume, progress=progress)
        try:
            return trainer.train()
        finally:
            trainer.close()


def open_training_data(cfg: DictConfig, global_batch: int):
    """The tile index (a view on `data.subset` when set) and the sampler over it."""
    index = TileIndex.open(cfg.data.index)
    if cfg.data.subset is not None:
        index = subset_view(index, cfg.data.subset)
    return index, build_sampler(cfg.sampler, index, global_batch)


def slide_preflight(cfg: DictConfig, index, *, progress: bool = True) -> str | None:
    """One line naming every slide of `index` that training would fail on, or None (also for
    tile stores, whose tiles were read once already)."""
    source = build_tile_source(cfg.data)
    try:
        if not isinstance(source, SlideTileSource):
            return None
        problems, slides = preflight_slides(index, source, threads=max(4, int(cfg.train.num_workers)),
                                            progress=progress)
        return describe(problems, slides) if problems else None
    finally:
        source.close()


def _batch_digest(batch: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(batch, dtype=np.int64).tobytes())


class Trainer:
    def __init__(self, cfg: DictConfig, output_dir: Path, ctx: DistContext, *, force_resume: bool = False,
                 progress: bool = True):
        self.cfg, self.output_dir, self.ctx = cfg, output_dir, ctx
        self.force_resume, self.progress = force_resume, progress
        self.ckpt_root = output_dir / ckpt.CHECKPOINTS
        self.total = int(cfg.train.iterations)
        self.global_batch = global_batch_size(cfg, ctx.world_size)
        self.seed = int(cfg.train.seed)
        self.last_checkpoint: Path | None = None
        self._loader_iter = None
        self.metrics: MetricsWriter | None = None
        if int(cfg.train.cpu_threads) > 0:
            torch.set_num_threads(int(cfg.train.cpu_threads))

        self.fsdp = ctx.distributed and cfg.train.distributed == "fsdp"
        self.index, self.sampler = open_training_data(cfg, self.global_batch)
        self._preflight()  # slide problems before the model is built, not in a DataLoader worker
        torch.manual_seed(self.seed)  # the same initial weights on every rank
        self.model = self._build_model()
        if self.fsdp:
            fsdp.shard_model(self.model, ctx.device)
        # after sharding, which replaces the parameters
        self.optimizer = build_optimizer(self.model.get_params_groups(), cfg)
        self.scaler = self.model.grad_scaler
        # FLOPs of a step over all ranks (counted on the first), and the ranks' peak FLOP/s if known
        self.step_flops: float | None = None
        peak = peak_flops(ctx.device, autocast_dtype(cfg.compute_precision.amp, ctx.device))
        self.peak_flops = peak * ctx.world_size if peak else None
        self.schedules = Schedules(cfg, self.global_batch)
        self.start = self._resume()
        if self.start == 0:
            self._seed_rank_rng()
        self._wrap_ddp()
        with ranks_agree(ctx):  # a full disk on rank 0 stops every rank with its line
            if ctx.is_main:
                save_config(cfg, output_dir / "config.yaml")
        self.batch_sampler = StepBatchSampler(self.sampler, ctx.rank, ctx.world_size, self.start)
        self.loader = self._build_loader()

    # ------------------------------------------------------------------ construction

    def _build_model(self) -> nn.Module:
        return SSLMetaArch(self.cfg).to(self.ctx.device)

    def _wrap_ddp(self) -> None:
        """Data parallel: each student module in DDP (SSLMetaArch calls each exactly once per
        step, through its wrapper); DDP's construction broadcasts rank 0's weights. The teacher
        follows by EMA of identical students, so it stays identical without communication."""
        if not self.ctx.distributed or self.fsdp:
            return
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        for name in list(self.model.student.keys()):
            self.model.student[name] = DistributedDataParallel(self.model.student[name], device_ids=ids)
        for tensor in self.model.teacher.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)

    def _state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state as a checkpoint holds it (`ModelState`)."""
        return ModelState(self.model, self.fsdp).state_dict()

    def checkpointed(self, iteration: int) -> dict[str, Any]:
        """What a checkpoint after `iteration` iterations holds besides its iteration, world size and
        config: key -> an object with state_dict() / load_state_dict(), in the order saved and loaded."""
        return {"model": ModelState(self.model, self.fsdp),
                "optimizer": OptimizerState(self.model, self.optimizer, self.fsdp),
                "grad_scaler": ScalerState(self.scaler), "sampler": SamplerState(self.sampler, iteration)}

    def _preflight(self) -> None:
        """Rank 0 opens every slide the index reaches (cached when clean) and every rank raises its
        one-line report; under data.on_error=skip the report is a warning and their tiles are
        substituted (and counted) as they fail."""
        report = slide_preflight(self.cfg, self.index, progress=self.progress) if self.ctx.is_main else None
        report = broadcast_object(report, self.ctx)
        if report is None:
            return
        if self.cfg.data.on_error == "skip":
            log.warning("%s (data.on_error=skip: their tiles are substituted)", report)
            return
        raise PreflightError(f"{report} (data.on_error=skip trains without their tiles)")

    def _build_loader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        tiles = TileDataset(self.index, build_tile_source(cfg.data), transform=None,
                            on_error=str(cfg.data.on_error))
        self.tiles = tiles
        dataset = SeededAugmentDataset(tiles, MultiCropAugmentation.from_config(cfg), self.seed)
        return build_loader(dataset, self.batch_sampler, build_collate(cfg, self.seed), cfg,
                            pin_memory=self.ctx.device.type == "cuda")

    def _seed_rank_rng(self) -> None:
        seed = derived_seed(self.seed, _RNG_STREAM, self.ctx.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    # ------------------------------------------------------------------ checkpoints

    def _check_fresh_output(self) -> None:
        """Before a run that resumes nothing writes config.yaml and metrics.jsonl: a directory holding
        another run (its config.yaml differs in a key outside RESUME_SAFE, or a metrics.jsonl without
        one) is refused, so none of that run is overwritten; a run that died before its first
        checkpoint (the same config) starts over."""
        config, metrics = self.output_dir / "config.yaml", self.output_dir / METRICS_FILE
        if config.is_file():
            unsafe, listed = config_changes(to_container(read_yaml(config)), self.cfg, str(config))
            if unsafe and not self.force_resume:
                raise ConfigError(f"{self.output_dir}: holds another run with no checkpoint to resume (its "
                                  f"config.yaml differs: {listed}); give another --output-dir or remove that "
                                  f"run (--force-resume writes over it)")
        elif metrics.is_file() and metrics.stat().st_size and not self.force_resume:
            raise UserError(f"{self.output_dir}: holds a {METRICS_FILE} but no config.yaml (another run's?); "
                            f"give another --output-dir or remove it (--force-resume writes over it)")

    def _resume(self) -> int:
        if not bool(self.cfg.train.resume):
            self._check_fresh_output()
            return 0
        found = ckpt.load_latest(self.ckpt_root, self.ctx)
        if found is None:
            self._check_fresh_output()
            return 0
        path, shared, rank_state = found
        check_resume_config(shared.get("config") or {}, self.cfg, str(path), force=self.force_resume)
        iteration = int(shared["iteration"])
        for key, part in self.checkpointed(iteration).items():
            part.load_state_dict(shared.get(key) if key == "grad_scaler" else shared[key])
        if rank_state is not None:
            ckpt.restore_rng_state(rank_state["rng"])
        else:
            log.warning("%s has no RNG state for rank %d (saved by %d ranks): reseeding it",
                        path, self.ctx.rank, shared.get("world_size"))
            self._seed_rank_rng()
        self.last_checkpoint = path
        log.info("resumed from %s at iteration %d", path, iteration)
        return iteration

    def save(self, iteration: int) -> Path:
        """Checkpoint after `iteration` completed iterations (collective)."""
        # the collective parts (FSDP's gathers) on every rank, the others on rank 0 only
        states = {key: part.state_dict() for key, part in self.checkpointed(iteration).items()
                  if part.collective or self.ctx.is_main}
        shared = None
        if self.ctx.is_main:
            shared = {"iteration": iteration, **states, "world_size": self.ctx.world_size,
                      "config": OmegaConf.to_container(self.cfg, resolve=True)}
        path = ckpt.save_checkpoint(self.ckpt_root, iteration, shared, {"rng": ckpt.capture_rng_state()},
                                    self.ctx, keep_last=int(self.cfg.checkpoint.keep_last))
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        every_ckpt = int(cfg.checkpoint.every_n_iterations)
        evaluates = bool(cfg.evaluation.benchmarks or cfg.evaluation.slide_tasks)
        every_eval = int(cfg.evaluation.every_n_iterations) if evaluates else 0
        self.metrics = MetricsWriter(self.output_dir, start_iteration=self.start, total_iterations=self.total,
                                     log_every=int(cfg.train.log_every), enabled=ctx.is_main)
        log.info("training iterations %d..%d, global batch %d over %d rank(s)", self.start, self.total,
                 self.global_batch, ctx.world_size)
        self.model.train()
        t_start = time.perf_counter()
        self._loader_iter = iter(self.loader)
        if every_eval > 0 and self.start == 0:
            self.evaluate(0)  # the learning curve's first point: the initialisation
        losses: dict[str, float] = {}
        stopped = False
        iteration = self.start
        while iteration < self.total:
            # data
            t0 = time.perf_counter()
            with ranks_agree(ctx):  # a failed read (a worker's exception) stops every rank before the step
                batch = next(self._loader_iter)
                global_batch = self._check_batch(batch, iteration)
            t_data = time.perf_counter() - t0

            # step
            values = self.schedules.at(iteration)
            apply_schedule(self.optimizer, values)
            self.optimizer.zero_grad(set_to_none=True)
            if self.step_flops is None:  # counted once per run, on its first step
                loss_dict, flops = counted(self.model.forward_backward, batch,
                                           teacher_temp=values.teacher_temp)
                self.step_flops = flops * ctx.world_size
            else:
                loss_dict = self.model.forward_backward(batch, teacher_temp=values.teacher_temp)
            losses, stop, skipped = self._reduce(loss_dict)
            self._check_skipped(skipped)
            if not all(math.isfinite(v) for v in losses.values()):
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {iteration} ({_fmt(losses)}); last good checkpoint: "
                    f"{self.last_checkpoint or 'none'}")
            grad_norm = self._optimizer_step()

            # EMA
            self.model.update_teacher(values.momentum)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            t_iter = time.perf_counter() - t0

            # logging
            record = {"iteration": iteration,
                      "pseudo_epoch": self.sampler.pseudo_epoch(iteration),
                      **losses, **values.as_dict(), "grad_norm": grad_norm,
                      "data_time": t_data, "step_time": t_iter - t_data, "iter_time": t_iter,
                      "samples_per_s": self.global_batch / t_iter,
                      **utilisation(self.step_flops, t_iter, self.peak_flops),
                      "batch_digest": _batch_digest(global_batch)}
            if ctx.is_main:
                record.update({f"sampler/{k}": v
                               for k, v in self.sampler.telemetry(global_batch, iteration).items()
                               if isinstance(v, (int, float))})
            self.metrics.write(record)
            iteration += 1

            # checkpoint, evaluation
            stopped = stop
            if stopped or iteration == self.total or (every_ckpt > 0 and iteration % every_ckpt == 0):
                self.save(iteration)
            if every_eval > 0 and iteration % every_eval == 0:
                self.evaluate(iteration)
            if stopped:
                log.warning("stop requested: checkpoint %s written, leaving at iteration %d",
                            self.last_checkpoint, iteration)
                break
        if stopped:
            _STOP.clear()  # honoured; a later run in this process starts afresh
        if not losses:  # nothing left to run (a finished run started again): its last logged losses
            last = (read_metrics(self.metrics.path) or [{}])[-1]
            losses = {k: v for k, v in last.items() if k.endswith("loss")}
        return {"iteration": iteration, "start_iteration": self.start, "losses": losses,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None, "stopped": stopped,
                "output_dir": str(self.output_dir), "metrics": str(self.metrics.path),
                "seconds": time.perf_counter() - t_start}

    def _check_batch(self, batch: dict[str, Any], iteration: int) -> np.ndarray:
        """The global batch of `iteration`, after checking that the loader delivered it."""
        if "error" in batch:  # a tile read failed in a DataLoader worker (see collate_seeded)
            raise batch["error"]
        if batch["step"] != iteration:
            raise RuntimeError(f"data loader delivered step {batch['step']} at iteration {iteration}")
        global_batch = self.batch_sampler.pop_global_batch(iteration)
        expected = self.sampler.rank_slice(global_batch, self.ctx.rank, self.ctx.world_size)
        if not np.array_equal(batch["row_ids"].numpy(), expected):
            raise RuntimeError(f"iteration {iteration}: batch rows differ from the sampler's slice")
        return global_batch

    def _reduce(self, loss_dict: dict[str, float]) -> tuple[dict[str, float], bool, int]:
        """Losses averaged over ranks, whether any rank was asked to stop, and the tiles substituted
        so far over all ranks: one all-reduce."""
        names = sorted(loss_dict)
        values = torch.tensor([float(loss_dict[k]) for k in names]
                              + [float(_STOP.is_set()), float(self.tiles.substitutions)],
                              dtype=torch.float64, device=self.ctx.device)
        if self.ctx.distributed:
            torch.distributed.all_reduce(values)
            values /= self.ctx.world_size
        out = values.tolist()
        return dict(zip(names, out[:-2])), out[-2] > 0, round(out[-1] * self.ctx.world_size)

    def _check_skipped(self, skipped: int) -> None:
        """Stop every rank together once more tiles than data.max_skipped were substituted."""
        limit = self.cfg.data.max_skipped
        if limit is None or skipped <= limit:
            return
        slides = self.tiles.unreadable_slides
        raise UnreadableSlidesError(
            f"data.max_skipped={limit}: {skipped} unreadable tiles substituted over {self.ctx.world_size} "
            f"rank(s); their slides{' on this rank' if self.ctx.distributed else ''}: "
            f"{', '.join(slides) or 'none here'} (each tile is in the log); last good checkpoint: "
            f"{self.last_checkpoint or 'none'}")

    def _optimizer_step(self) -> float:
        """Clip per student module (as DINOv2), step; the total gradient norm before clipping. Under
        FSDP the gradients are DTensor shards: clip_grad_norm_ reduces their norms over the ranks."""
        student = self.model.student
        clip = float(self.cfg.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = clip if clip > 0 else math.inf
        norms = [fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm))
                 for m in student.values()]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(torch.linalg.vector_norm(torch.stack(norms)).item())

    def evaluate(self, iteration: int) -> None:
        """The configured tile benchmarks, then slide tasks (results in `slide/`), on the teacher backbone
        (rank 0; others wait). Under FSDP, on an unsharded copy gathered to rank 0."""
        teacher = self.model.teacher["backbone"]
        if self.fsdp:
            state = fsdp.full_state_dict(teacher)
            if self.ctx.is_main:
                teacher = build_student_backbone(self.cfg)
                teacher.load_state_dict(state)
                teacher.to(self.ctx.device).eval()
        with ranks_agree(self.ctx):  # the others wait for rank 0, and stop with it if it fails
            if self.ctx.is_main:
                self._evaluate_on_main(teacher, iteration)

    def _evaluate_on_main(self, teacher: nn.Module, iteration: int) -> None:
        cfg = self.cfg.evaluation
        out = self.output_dir / "eval" / ckpt.checkpoint_name(iteration)
        if cfg.benchmarks:
            eval_cfg = OmegaConf.load(cfg.config_file) if cfg.config_file else None
            results = run_benchmarks(teacher, list(cfg.benchmarks), eval_cfg, out)
            self.metrics.write(learning_curve_record(results, iteration), progress=False)
        if cfg.slide_tasks:
            slide_cfg = OmegaConf.load(cfg.slide_config_file) if cfg.slide_config_file else None
            slide_runner.run_slide_tasks(teacher, list(cfg.slide_tasks), slide_cfg, out / "slide",
                                         backbone_name=f"teacher {ckpt.checkpoint_name(iteration)}")
        self.model.train()

    def close(self) -> None:
        self._loader_iter = None  # shuts the workers down
        if self.metrics is not None:
            self.metrics.close()
        self._unwrap_ddp()

    def _unwrap_ddp(self) -> None:
        """Drop the DDP wrappers while the process group is still registered. A DDP's reducer
        holding the group's last reference destroys it with the GIL held, and that destructor waits
        for a gloo worker thread which, releasing the tensors of a finished collective, waits for the
        GIL: a deadlock, in 2 of 71 2-rank SLURM jobs under load (torch 2.13). Registered, the group is
        destroyed by `destroy_process_group`, whose binding releases the GIL first."""
        for name in list(self.model.student.keys()):
            self.model.student[name] = unwrap(self.model.student[name])


def learning_curve_record(results: dict[str, dict], iteration: int) -> dict[str, Any]:
    """One metrics.jsonl record of the teacher's test balanced accuracy per benchmark and head after
    `iteration` steps (`eval/NAME/linear`, `eval/NAME/knn_K`, `eval/NAME/logreg`). It is filed under
    the step before (iteration - 1), so a resume from the checkpoint written with it keeps it."""
    record: dict[str, Any] = {"iteration": iteration - 1, "eval_iteration": iteration}
    for name, result in results.items():
        for head in ("linear", "logreg"):
            if head in result:
                record[f"eval/{name}/{head}"] = result[head]["balanced_accuracy"]
        for k, knn in result.get("knn", {}).items():
            record[f"eval/{name}/knn_{k}"] = knn["balanced_accuracy"]
    return record


def _fmt(losses: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
