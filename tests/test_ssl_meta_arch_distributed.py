"""Two gloo ranks on CPU: Sinkhorn-Knopp and centering match one process holding both ranks' rows,
and the meta-architecture trains with DDP-wrapped student modules (gradients synchronised)."""

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dinov2_patho.loss import DINOLoss
from dinov2_patho.loss.centering import sinkhorn_knopp
from dinov2_patho.train.ssl_meta_arch import SSLMetaArch

WORLD = 2


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        _check_sinkhorn_and_center(rank)
        _check_ddp_step(rank)
    finally:
        gc.collect()  # DDP reducers hold the group: free them before it goes
        dist.destroy_process_group()
    # Passed: skip interpreter teardown, where gloo's threads can abort a finished spawn
    # worker ("terminate called without an active exception") and fail a passing test.
    os._exit(0)


def _check_sinkhorn_and_center(rank: int) -> None:
    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    rows = [slice(0, 3), slice(3, 10)]  # unequal shares, as iBOT's masked patches per rank
    q = sinkhorn_knopp(logits[rows[rank]], temp=0.2)
    expected = _single_process(lambda: sinkhorn_knopp(logits, temp=0.2))
    assert torch.allclose(q, expected[rows[rank]], atol=1e-6)
    loss = DINOLoss(6, center_momentum=0.5)
    loss.update_center(logits[rows[rank]])
    assert torch.allclose(loss.center, 0.5 * logits.mean(dim=0, keepdim=True), atol=1e-6)
    empty = sinkhorn_knopp(logits[:0] if rank == 0 else logits, temp=0.2)  # a rank with no rows
    if rank == 1:
        assert torch.allclose(empty, _single_process(lambda: sinkhorn_knopp(logits, temp=0.2)), atol=1e-6)


def _single_process(fn):
    """Run `fn` as if torch.distributed were not initialised (the one-process reference)."""
    from dinov2_patho.loss import centering

    real = centering.is_initialized
    centering.is_initialized = lambda: False
    try:
        return fn()
    finally:
        centering.is_initialized = real


def _check_ddp_step(rank: int) -> None:
    from test_ssl_meta_arch import make_batch, synthetic_tiles, tiny_cfg

    torch.manual_seed(0)  # identical students on both ranks
    cfg = tiny_cfg()
    arch = SSLMetaArch(cfg).train()
    for name in list(arch.student.keys()):
        arch.student[name] = DistributedDataParallel(arch.student[name])
    batch = make_batch(cfg, synthetic_tiles(2, seed=10 + rank), seed=rank)  # different data per rank
    losses = arch.forward_backward(batch, teacher_temp=0.07)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    grads = torch.cat([p.grad.flatten() for p in arch.student.parameters()])
    gathered = [torch.empty_like(grads) for _ in range(WORLD)]
    dist.all_gather(gathered, grads)
    assert torch.allclose(gathered[0], gathered[1])  # DDP averaged them
    loss_values = [None] * WORLD
    dist.all_gather_object(loss_values, losses["total_loss"])
    assert loss_values[0] != loss_values[1]  # the ranks really saw different data
    teacher_before = [t.clone() for t in arch.teacher.parameters()]
    torch.optim.SGD(arch.student.parameters(), lr=0.1).step()
    arch.update_teacher(0.5)  # through the DDP wrappers
    teacher = torch.cat([t.flatten() for t in arch.teacher.parameters()])
    expected = torch.cat([(0.5 * t0 + 0.5 * s).flatten()
                          for t0, s in zip(teacher_before, arch.student.parameters())])
    assert torch.allclose(teacher, expected, atol=1e-6)
    dist.all_gather(gathered, teacher)
    assert torch.equal(gathered[0], gathered[1])


def test_two_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
