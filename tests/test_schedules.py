import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from dinov2_patho.config_files import ConfigError
from dinov2_patho.train.config import load_train_config
from dinov2_patho.train.schedules import Schedules, scaled_lr, warmup_cosine


def _reference(it, base, final, total, warmup, start):
    """DINOv2's CosineScheduler, written out as its arrays."""
    sched = [start + (base - start) * i / max(warmup - 1, 1) for i in range(warmup)]
    n = total - warmup
    sched += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return final if it >= total else sched[it]


@given(total=st.integers(1, 300), warmup_frac=st.floats(0, 1), it=st.integers(0, 400),
       base=st.floats(1e-6, 10), final=st.floats(0, 10), start=st.floats(0, 1))
def test_warmup_cosine_matches_dinov2_arrays(total, warmup_frac, it, base, final, start):
    warmup = int(total * warmup_frac)
    if warmup == total and total > 0:
        warmup = total - 1
    got = warmup_cosine(it, base=base, final=final, total=total, warmup=warmup, start_warmup=start)
    assert got == pytest.approx(_reference(it, base, final, total, warmup, start), rel=1e-9, abs=1e-12)


@given(total=st.integers(2, 500), base=st.floats(0.01, 1), final=st.floats(0, 0.01))
def test_cosine_is_monotone_between_base_and_final(total, base, final):
    values = [warmup_cosine(i, base=base, final=final, total=total) for i in range(total + 3)]
    assert values[0] == pytest.approx(base)
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))
    assert values[-1] == final


def test_lr_scaling_rule():
    assert scaled_lr(2e-4, 2048, "sqrt_wrt_1024") == pytest.approx(2e-4 * math.sqrt(2))
    assert scaled_lr(2e-4, 256, "linear_wrt_1024") == pytest.approx(5e-5)
    with pytest.raises(ConfigError, match="scaling_rule"):
        scaled_lr(1.0, 1024, "cubic")


def test_schedules_from_config():
    cfg = load_train_config(None, [
        "train.iterations=100", "optim.warmup_iterations=10", "optim.freeze_last_layer_iterations=5",
        "teacher.warmup_teacher_temp_iterations=20", "optim.base_lr=0.001", "data.index=x",
    ])
    s = Schedules(cfg, global_batch=4096)
    peak = 0.001 * 2
    first, warm_end, last = s.at(0), s.at(9), s.at(99)
    assert first.lr == 0.0 and first.last_layer_lr == 0.0
    assert s.at(4).last_layer_lr == 0.0 and s.at(5).last_layer_lr == s.at(5).lr > 0
    assert warm_end.lr == pytest.approx(peak)
    assert s.at(10).lr == pytest.approx(peak)
    assert cfg.optim.min_lr < last.lr < s.at(50).lr < peak and s.at(100).lr == cfg.optim.min_lr
    assert first.teacher_temp == cfg.teacher.warmup_teacher_temp
    assert s.at(20).teacher_temp == s.at(99).teacher_temp == cfg.teacher.teacher_temp
    assert first.momentum == pytest.approx(cfg.teacher.momentum_teacher) and s.at(100).momentum == 1.0
    assert first.wd == pytest.approx(cfg.optim.weight_decay) and s.at(100).wd == cfg.optim.weight_decay_end
    assert isinstance(OmegaConf.to_yaml(cfg), str)


def test_default_warmups_are_dinov2s_shares_of_the_schedule():
    # ssl_default_config: 100 epochs; lr warmup 10, teacher-temperature warmup 30, last layer frozen 1
    cfg = load_train_config(None, ["data.index=x"])
    total = cfg.train.iterations
    assert cfg.optim.warmup_iterations / total == pytest.approx(10 / 100)
    assert cfg.teacher.warmup_teacher_temp_iterations / total == pytest.approx(30 / 100)
    assert cfg.optim.freeze_last_layer_iterations / total == pytest.approx(1 / 100)
