"""train.distributed=fsdp on two gloo ranks (CPU): the model is really sharded, training follows DDP's
losses, a checkpoint written under FSDP has DDP's full format, resumes exactly and exports."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from test_train import SMOKE, TINY, _data, _env

from dinov2_patho.config_files import ConfigError
from dinov2_patho.train.config import load_train_config, validate_config
from dinov2_patho.train.metrics_log import read_metrics

ITERATIONS = 4
LOSSES = ["total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"]

# One torchrun, several runs in its process group (run_training joins an existing group): DDP, FSDP,
# and an FSDP run stopped after 2 iterations then resumed, each into its own directory.
_WORKER = '''
import json, os, sys
import torch
from torch.distributed.tensor import DTensor
from dinov2_patho.train import trainer
from dinov2_patho.train.config import load_train_config
from dinov2_patho.train.ssl_meta_arch import unwrap

torch.distributed.init_process_group("gloo")
out, config, args = sys.argv[1], sys.argv[2], sys.argv[3:]
stop_after = {"value": None}
sharding = {}
check = trainer.Trainer._check_batch
def check_and_maybe_stop(self, batch, iteration):
    if iteration + 1 == stop_after["value"]:
        trainer.request_stop()
    weight = unwrap(self.model.student["backbone"]).blocks[0].attn.qkv.weight
    sharding.update(dtensor=isinstance(weight, DTensor), local_rows=weight.to_local().shape[0]
                    if isinstance(weight, DTensor) else weight.shape[0], rows=weight.shape[0])
    return check(self, batch, iteration)
trainer.Trainer._check_batch = check_and_maybe_stop

result = {}
for name, mode, stop in [("ddp", "ddp", None), ("fsdp", "fsdp", None), ("resumed", "fsdp", 2),
                         ("resumed", "fsdp", None)]:
    stop_after["value"] = stop
    cfg = load_train_config(config, [*args, f"train.distributed={mode}"])
    summary = trainer.run_training(cfg, os.path.join(out, name))
    result.setdefault(name, []).append({"summary": summary, **sharding})
rank = torch.distributed.get_rank()
torch.distributed.destroy_process_group()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
'''


@pytest.fixture(scope="module")
def runs(cohort, cohort_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "worker.py"
    script.write_text(_WORKER)
    # stochastic depth: the resumed run must also continue the model's RNG stream exactly
    args = [*_data(cohort, cohort_index), *TINY, f"train.iterations={ITERATIONS}", "train.num_workers=0",
            "train.batch_size_per_gpu=4", "train.log_every=1", "checkpoint.every_n_iterations=2",
            "student.drop_path_rate=0.1", "ibot.separate_head=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(out), str(SMOKE), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_fsdp_shards_parameters_and_follows_ddp(runs):
    out, ranks = runs
    for rank in ranks:
        assert not rank["ddp"][0]["dtensor"]
        fsdp = rank["fsdp"][0]
        assert fsdp["dtensor"] and fsdp["local_rows"] == fsdp["rows"] // 2  # one half per rank
    ddp, fsdp = (read_metrics(out / name / "metrics.jsonl") for name in ("ddp", "fsdp"))
    assert [r["iteration"] for r in fsdp] == list(range(ITERATIONS))
    assert [r["batch_digest"] for r in fsdp] == [r["batch_digest"] for r in ddp]
    # Same weights and data, so iteration 0's losses agree to fp32 rounding; later ones differ only by
    # the order in which gradients and their norms are summed (reduce-scatter of shards vs all-reduce),
    # a few ulps that AdamW's normalised step carries into the next losses (measured: <= 3e-7 relative).
    for k in LOSSES:
        assert math.isclose(fsdp[0][k], ddp[0][k], rel_tol=1e-6, abs_tol=1e-7), k
        for got, want in zip(fsdp[1:], ddp[1:]):
            assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-7), (k, got["iteration"])
    for got, want in zip(fsdp, ddp):  # clipping sees the same total norm from the sharded gradients
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=1e-5), got["iteration"]
    # training moved the student away from the initial weights under FSDP too
    assert fsdp[-1]["total_loss"] != fsdp[0]["total_loss"]


@pytest.mark.slow
def test_fsdp_checkpoint_has_ddp_format_resumes_exactly_and_exports(runs, tmp_path):
    from dinov2_patho.backbones.teacher import export_teacher, teacher_backbone
    from dinov2_patho.models import load_pretrained
    from dinov2_patho.train.checkpoint import find_latest, iteration_of, load_checkpoint

    out, ranks = runs
    # the stopped run checkpointed at 2, the second call resumed from there
    assert [r["summary"]["iteration"] for r in ranks[0]["resumed"]] == [2, ITERATIONS]
    assert ranks[0]["resumed"][0]["summary"]["stopped"]
    keys = ["iteration", "batch_digest", "lr", "teacher_temp", "grad_norm", *LOSSES]
    reference = read_metrics(out / "fsdp" / "metrics.jsonl")
    resumed = read_metrics(out / "resumed" / "metrics.jsonl")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in reference]

    fsdp_state, _ = load_checkpoint(find_latest(out / "fsdp" / "checkpoints"), 0)
    ddp_state, _ = load_checkpoint(find_latest(out / "ddp" / "checkpoints"), 0)
    assert iteration_of(find_latest(out / "fsdp" / "checkpoints")) == ITERATIONS
    model = fsdp_state["model"]
    assert model.keys() == ddp_state["model"].keys()
    assert all(not hasattr(v, "full_tensor") and v.shape == ddp_state["model"][k].shape
               for k, v in model.items())
    optim, ddp_optim = fsdp_state["optimizer"], ddp_state["optimizer"]
    assert [g["params"] for g in optim["param_groups"]] == [g["params"] for g in ddp_optim["param_groups"]]
    assert optim["state"].keys() == ddp_optim["state"].keys()
    assert all(optim["state"][i]["exp_avg"].shape == ddp_optim["state"][i]["exp_avg"].shape
               for i in optim["state"])
    # the resumed run ends on the uninterrupted run's weights, bit for bit
    resumed_state, _ = load_checkpoint(find_latest(out / "resumed" / "checkpoints"), 0)
    assert all(torch.equal(resumed_state["model"][k], v) for k, v in model.items())

    written = export_teacher(out / "fsdp", tmp_path / "export")
    teacher = teacher_backbone(out / "fsdp")
    assert all(torch.equal(model[f"teacher.backbone.{k}"], v) for k, v in teacher.state_dict().items())
    fresh = copy.deepcopy(teacher)
    for param in fresh.parameters():
        param.data.zero_()
    load_pretrained(fresh, str(written["dinov2"]), format="dinov2")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), teacher(x))


def test_fsdp_rejects_fp16(cohort, cohort_index):
    cfg = load_train_config(SMOKE, [*_data(cohort, cohort_index), "train.distributed=fsdp",
                                    "compute_precision.amp=fp16"])
    with pytest.raises(ConfigError, match="train.distributed=fsdp"):
        validate_config(cfg)
    validate_config(load_train_config(SMOKE, [*_data(cohort, cohort_index), "train.distributed=fsdp"]))


def test_the_backbones_view_outputs_do_not_warn(cohort, cohort_index, tmp_path):
    """FSDP2's 'returned a view tensor' warning, about the backbone's token slices, is not printed."""
    import warnings

    import torch.distributed as dist

    from dinov2_patho.train.fsdp import shard_model
    from dinov2_patho.train.ssl_meta_arch import SSLMetaArch

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = SSLMetaArch(load_train_config(SMOKE, [*_data(cohort, cohort_index), *TINY]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shard_model(model, torch.device("cpu"))
            model.student["backbone"](torch.randn(2, 3, 64, 64), is_training=True)
        assert not [w for w in caught if "view tensor" in str(w.message)]
    finally:
        dist.destroy_process_group()
