"""SLURM: submit training and evaluation jobs with submitit (`dinov2-patho launch`), with
torch.distributed's env:// variables taken from SLURM's and checkpoint/requeue on preemption."""
