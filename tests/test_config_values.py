"""Training config values outside their domain are one-line errors naming the key; explicit ViT
sizes and `student.arch` are not both accepted; a resume under a changed config names the keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.config_files import NON_NEGATIVE, POSITIVE, UNIT, UNIT_HALF_OPEN, UNIT_OPEN, ConfigError
from dinov2_patho.errors import UserError
from dinov2_patho.train.config import check_values, load_train_config, validate_config
from dinov2_patho.train.config_values import RESUME_SAFE, check_resume_config

# the domains each section's dataclass checks (its __post_init__)
NUMBERS = {
    "optim.base_lr": POSITIVE, "optim.min_lr": NON_NEGATIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.weight_decay_end": NON_NEGATIVE, "optim.clip_grad": NON_NEGATIVE,
    "optim.layerwise_decay": UNIT_HALF_OPEN, "optim.patch_embed_lr_mult": NON_NEGATIVE,
    "optim.adamw_beta1": UNIT_OPEN, "optim.adamw_beta2": UNIT_OPEN,
    "teacher.momentum_teacher": UNIT, "teacher.final_momentum_teacher": UNIT,
    "teacher.warmup_teacher_temp": POSITIVE, "teacher.teacher_temp": POSITIVE,
    "dino.loss_weight": NON_NEGATIVE, "dino.koleo_loss_weight": NON_NEGATIVE,
    "ibot.loss_weight": NON_NEGATIVE, "student.drop_path_rate": UNIT_OPEN,
}
INTEGERS = {  # key: minimum
    "optim.warmup_iterations": 0, "optim.freeze_last_layer_iterations": 0,
    "teacher.warmup_teacher_temp_iterations": 0, "student.patch_size": 1, "student.num_register_tokens": 0,
    **{f"{head}.head_{size}": 1 for head in ("dino", "ibot")
       for size in ("n_prototypes", "bottleneck_dim", "nlayers", "hidden_dim")},
    "data.cache_size": 1, "train.iterations": 1, "train.batch_size_per_gpu": 1, "train.num_workers": 0,
    "train.prefetch_factor": 1, "train.log_every": 1, "train.seed": 0, "train.cpu_threads": 0,
    "checkpoint.every_n_iterations": 0, "checkpoint.keep_last": 1, "evaluation.every_n_iterations": 0,
}

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "train" / "cpu_smoke.yaml"
# values just outside each domain
OUTSIDE = {POSITIVE: [0.0, -1e-3, -4.0], NON_NEGATIVE: [-1e-6, -1.0], UNIT: [-0.01, 1.01],
           UNIT_OPEN: [1.0, -0.1], UNIT_HALF_OPEN: [0.0, 1.5]}


def test_the_shipped_configs_are_inside_every_domain():
    for name in ("cpu_smoke", "vitl14_t1_bs", "vitl14_t1_random", "vitl14_metadata"):
        check_values(load_train_config(SMOKE.parent / f"{name}.yaml"))
    check_values(load_train_config())


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_value_outside_its_domain_names_the_key(data):
    key = data.draw(st.sampled_from(sorted(NUMBERS)))
    value = data.draw(st.sampled_from(OUTSIDE[NUMBERS[key]]))
    cfg = load_train_config(SMOKE, [f"{key}={value}"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert str(info.value).startswith(f"{key}={value}: must be") and "\n" not in str(info.value)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_integers_below_their_minimum_or_fractional_are_refused(data):
    key = data.draw(st.sampled_from(sorted(INTEGERS)))
    value = data.draw(st.sampled_from([INTEGERS[key] - 1, INTEGERS[key] + 0.5]))
    with pytest.raises(ConfigError, match=rf"^{key}={value}: must be an integer >= {INTEGERS[key]}$"):
        check_values(load_train_config(SMOKE, [f"{key}={value}"]))


def test_an_unknown_student_arch_is_refused_before_any_model_is_built():
    # the registry's KeyError came as a traceback only once the slides were checked; a dry run passed
    with pytest.raises(ConfigError, match=r"^student.arch='vit_smal' is unknown \(valid: .*vit_small;"):
        check_values(load_train_config(None, ["student.arch=vit_smal"]))
    check_values(load_train_config(None, ["student.arch=vit_small"]))


def test_a_negative_learning_rate_and_a_string_are_refused():
    with pytest.raises(ConfigError, match=r"^optim.base_lr=-0.001: must be > 0$"):
        check_values(load_train_config(SMOKE, ["optim.base_lr=-0.001"]))
    with pytest.raises(ConfigError, match=r"^teacher.teacher_temp='hot': must be a number$"):
        check_values(load_train_config(SMOKE, ["teacher.teacher_temp=hot"]))
    with pytest.raises(ConfigError, match=r"^data.mpp_override=0.0: must be > 0 \(or null\)$"):
        check_values(load_train_config(SMOKE, ["data.mpp_override=0"]))
    with pytest.raises(UserError, match=r"augmentation.hflip_p=2"):
        check_values(load_train_config(SMOKE, ["augmentation.hflip_p=2"]))


def test_arch_and_explicit_sizes_are_not_both_taken():
    # cpu_smoke gives sizes: naming an arch on top of them would be silently ignored
    with pytest.raises(ConfigError, match=r"student.arch=vit_small and student.embed_dim are both set"):
        check_values(load_train_config(SMOKE, ["student.arch=vit_small"]))
    check_values(load_train_config(SMOKE, ["student.arch=null"]))
    check_values(load_train_config(None, ["student.arch=vit_small"]))


def _saved(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(load_train_config(SMOKE, list(overrides)), resolve=True)


def test_resume_with_a_changed_config_warns_or_refuses_naming_the_keys(caplog):
    saved = _saved()
    check_resume_config(saved, load_train_config(SMOKE), "ckpt", force=False)  # unchanged: silent
    assert not caplog.records
    check_resume_config(saved, load_train_config(SMOKE, ["train.num_workers=0", "checkpoint.keep_last=5"]),
                        "ckpt", force=False)
    assert "train.num_workers (2 -> 0)" in caplog.text and "checkpoint.keep_last (2 -> 5)" in caplog.text
    changed = load_train_config(SMOKE, ["optim.base_lr=0.01", "train.log_every=3"])
    expected = (r"^resuming ckpt with a changed config: optim.base_lr would break exact resume "
                r"\(changed: optim.base_lr \(0.04 -> 0.01\), train.log_every")
    with pytest.raises(ConfigError, match=expected):
        check_resume_config(saved, changed, "ckpt", force=False)
    caplog.clear()
    check_resume_config(saved, changed, "ckpt", force=True)
    assert "optim.base_lr (0.04 -> 0.01)" in caplog.text and "forced" in caplog.text


@settings(max_examples=20, deadline=None)
@given(key=st.sampled_from(["sampler.seed", "train.batch_size_per_gpu", "train.seed",
                            "crops.local_crops_number", "train.iterations", "dino.koleo_loss_weight"]))
def test_keys_that_change_the_batches_or_the_steps_are_not_resume_safe(key):
    assert not key.startswith(RESUME_SAFE)
    saved = _saved()
    value = 3 if key != "dino.koleo_loss_weight" else 0.5
    with pytest.raises(ConfigError, match=key):
        check_resume_config(saved, load_train_config(SMOKE, [f"{key}={value}"]), "ckpt", force=False)
