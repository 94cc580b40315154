"""DINOv2's self-supervised meta-architecture: a student and its EMA teacher, each a backbone with
a DINO head (and an iBOT head when `ibot.separate_head`), trained with DINO + iBOT + KoLeo.

`forward_backward` computes the losses and calls backward(), so the trainer only clips and steps
the optimizer, then calls `update_teacher`. The trainer may wrap `student[name]` modules in DDP:
every student module is called exactly once per step, through its wrapper. Under FSDP
(`train/fsdp.py`) student and teacher modules are sharded alike, so `update_teacher`'s foreach ops
run on matching DTensor shards. Its config sections: `dino` (`DinoConfig`), `ibot` (`IbotConfig`),
`compute_precision` (`PrecisionConfig`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinov2_patho.config_files import NON_NEGATIVE, check_section
from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger
from dinov2_patho.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2_patho.models import DINOHead, load_pretrained
from dinov2_patho.models.student import build_student_backbone

log = get_logger(__name__)

CENTERINGS = ("sinkhorn_knopp", "centering")
# Backbone parameters before the first block: layer 0 of the layer-wise lr decay, and by default no
# weight decay for the tokens and position embeddings (they are not weights of a linear map; timm,
# BEiT and MAE exempt them too). DINOv2 decays them: optim.token_weight_decay=true does as it does.
_EMBEDDING_PARAMS = ("cls_token", "register_tokens", "mask_token", "pos_embed")

_HEAD_SIZES = {"head_n_prototypes": 1, "head_bottleneck_dim": 1, "head_nlayers": 1, "head_hidden_dim": 1}


@dataclass
class DinoConfig:
    """The `dino` section of the training config: the DINO head and the DINO and KoLeo terms."""

    loss_weight: float = 1.0          # on the mean over crop pairs; with local_crops_number 0, 0.667 gives
    head_n_prototypes: int = 65536    # DINOv2's weight
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1

    def __post_init__(self) -> None:
        check_section("dino", self, numbers={"loss_weight": NON_NEGATIVE, "koleo_loss_weight": NON_NEGATIVE},
                      integers=_HEAD_SIZES)


@dataclass
class IbotConfig:
    """The `ibot` section of the training config: the masks, the iBOT term and its head."""

    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5  # fraction of global crops that get a mask
    # masked fraction of the patches, spread evenly over the masked crops
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048

    def __post_init__(self) -> None:
        check_section("ibot", self, numbers={"loss_weight": NON_NEGATIVE}, integers=_HEAD_SIZES)


@dataclass
class PrecisionConfig:
    """The `compute_precision` section of the training config."""

    amp: Any = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | "off" (or false, YAML's off)
    grad_scaler: bool = True          # fp16 only: loss scaling (SSLMetaArch.grad_scaler)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar `.module`) wrapper."""
    return getattr(module, "module", module)


def backbone_features(backbone: nn.Module, x: Tensor | list[Tensor],
                      masks: Tensor | list[Tensor | None] | None = None) -> Any:
    """`forward_features` of a backbone, through `__call__` so a DDP wrapper syncs its gradients and
    FSDP's hooks gather the (student's or teacher's) sharded parameters."""
    return backbone(x, masks, is_training=True)


def autocast_dtype(amp: str | bool, device: torch.device) -> torch.dtype | None:
    """compute_precision.amp -> autocast dtype (None: full fp32). auto: bf16 on GPU, fp32 on CPU."""
    if amp is False:  # YAML reads an unquoted `off` as false
        amp = "off"
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise UserError(f"config: compute_precision.amp={amp!r} is not one of auto, bf16, fp16, off")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def _check_ibot(ibot: DictConfig) -> None:
    lo, hi = (float(v) for v in ibot.mask_ratio_min_max)
    if not 0 <= lo <= hi <= 1:
        raise UserError(f"config: ibot.mask_ratio_min_max={[lo, hi]} must satisfy 0 <= min <= max <= 1")
    if not 0 <= float(ibot.mask_sample_probability) <= 1:
        raise UserError(f"config: ibot.mask_sample_probability={ibot.mask_sample_probability} "
                        "is not in [0, 1]")


def _head(in_dim: int, section: DictConfig) -> DINOHead:
    return DINOHead(in_dim, out_dim=section.head_n_prototypes, hidden_dim=section.head_hidden_dim,
                    bottleneck_dim=section.head_bottleneck_dim, nlayers=section.head_nlayers)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: DictConfig, backbone: nn.Module | None = None):
        """`backbone`: use this module instead of building it from `student.*` (with its
        pretrained_weights); tests and custom models."""
        super().__init__()
        self.cfg = cfg
        self.centering = cfg.teacher.centering
        if self.centering not in CENTERINGS:
            raise UserError(f"config: teacher.centering={self.centering!r} is not one of "
                            f"{', '.join(CENTERINGS)}")
        self.dino_loss_weight = float(cfg.dino.loss_weight)
        self.ibot_loss_weight = float(cfg.ibot.loss_weight)
        self.koleo_loss_weight = float(cfg.dino.koleo_loss_weight)
        self.separate_ibot_head = bool(cfg.ibot.separate_head)
        self.amp = cfg.compute_precision.amp
        autocast_dtype(self.amp, torch.device("cpu"))  # validate early
        _check_ibot(cfg.ibot)
        if backbone is None:
            backbone = self._build_backbone(cfg)
            arch = cfg.student.arch or type(backbone).__name__
        else:
            arch = type(backbone).__name__
        self.embed_dim = backbone.embed_dim
        self.patch_size = backbone.patch_size
        for key in ("global_crops_size", "local_crops_size"):
            if cfg.crops[key] % self.patch_size:
                raise UserError(f"config: crops.{key}={cfg.crops[key]} is not a multiple of the patch size "
                                f"{self.patch_size}")

        student = {"backbone": backbone, "dino_head": _head(self.embed_dim, cfg.dino)}
        if self.separate_ibot_head:
            student["ibot_head"] = _head(self.embed_dim, cfg.ibot)
        self.student = nn.ModuleDict(student)
        # The teacher starts as the student and then only follows it by EMA: no gradients.
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        ibot_dim = cfg.ibot.head_n_prototypes if self.separate_ibot_head else cfg.dino.head_n_prototypes
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()
        # fp16 needs loss scaling; the trainer steps through it (grad_scaler.step(optimizer)).
        use_scaler = self.amp == "fp16" and bool(cfg.compute_precision.grad_scaler)
        self.grad_scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        log.info("SSLMetaArch: %s, embed_dim %d, DINO x%.3g, iBOT x%.3g (%s head), KoLeo x%.3g, %s",
                 arch, self.embed_dim,
                 self.dino_loss_weight, self.ibot_loss_weight,
                 "separate" if self.separate_ibot_head else "shared", self.koleo_loss_weight, self.centering)

    @staticmethod
    def _build_backbone(cfg: DictConfig) -> nn.Module:
        backbone = build_student_backbone(cfg)
        weights = cfg.student.get("pretrained_weights")
        if weights:
            from dinov2_patho.backbones.hub import is_hub_name, saved_weights

            load_pretrained(backbone, saved_weights(weights) if is_hub_name(weights) else weights)
        return backbone

    # ------------------------------------------------------------------ training step

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher, ever
        return self

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @torch.no_grad()
    def _teacher_targets(self, global_crops: Tensor, mask_indices: Tensor,
                         teacher_temp: float) -> tuple[Tensor, Tensor]:
        """Teacher probabilities for the student's CLS tokens [2B, K] (views swapped: the student's
        view 1 learns from the teacher's view 2 and vice versa) and for its masked patches [M, K']."""
        out = backbone_features(self.teacher["backbone"], global_crops)
        cls_a, cls_b = out["x_norm_clstoken"].chunk(2)
        cls = torch.cat([cls_b, cls_a])
        patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        if self.separate_ibot_head:
            dino_logits = self.teacher["dino_head"](cls)
            ibot_logits = self.teacher["ibot_head"](patches)
        else:
            dino_logits, ibot_logits = self.teacher["dino_head"](torch.cat([cls, patches])).split(
                [cls.shape[0], patches.shape[0]])
        if self.centering == "centering":
            dino_probs = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
            self.dino_loss.update_center(dino_logits)
            ibot_probs = self.ibot_patch_loss.softmax_center_teacher(ibot_logits, teacher_temp)
            self.ibot_patch_loss.update_center(ibot_logits)
        else:
            dino_probs = self.dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp)
            ibot_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(ibot_logits, teacher_temp)
        return dino_probs, ibot_probs

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, float]:
        """One step's losses on a `collate_multicrop` batch, backpropagated into the student.
        Returns the weighted total ("total_loss") and its unweighted parts."""
        device = self.device
        n_global, n_local = batch["n_global_crops"], batch["n_local_crops"]
        if n_global != 2:
            raise ValueError(f"DINOv2 training needs 2 global crops per sample, got {n_global}")
        global_crops = batch["global_crops"].to(device, non_blocking=True)
        local_crops = batch["local_crops"].to(device, non_blocking=True)
        masks = batch["masks"].to(device, non_blocking=True)
        mask_indices = batch["mask_indices"].to(device, non_blocking=True)
        masks_weight = batch["masks_weight"].to(device, non_blocking=True)
        n_masked = mask_indices.shape[0]

        dtype = autocast_dtype(self.amp, device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            dino_probs, ibot_probs = self._teacher_targets(global_crops, mask_indices, teacher_temp)

            crops, crop_masks = [global_crops], [masks]
            if n_local:
                crops.append(local_crops)
                crop_masks.append(None)
            outputs = backbone_features(self.student["backbone"], crops, crop_masks)
            global_cls = outputs[0]["x_norm_clstoken"]
            local_cls = outputs[1]["x_norm_clstoken"] if n_local else global_cls[:0]
            masked_patches = outputs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_indices]

            # One call per head module (a DDP-wrapped module must run once per step).
            head_inputs = [local_cls, global_cls] + ([] if self.separate_ibot_head else [masked_patches])
            head_out = self.student["dino_head"](torch.cat(head_inputs))
            local_logits, global_logits, *rest = head_out.split([t.shape[0] for t in head_inputs])
            ibot_logits = self.student["ibot_head"](masked_patches) if self.separate_ibot_head else rest[0]

        # Cross-entropy averaged over every (student crop, other teacher view) pair: 2 global pairs,
        # 2 * n_local local ones. DINOv2 divides by 2 + max(2 * n_local, 1): the same with local crops,
        # 3 without them, where its DINO term is 2/3 of ours against iBOT and KoLeo (dino.loss_weight
        # 0.667 gives its weighting there).
        n_pairs = 2 + 2 * n_local
        dino_local = (self.dino_loss(local_logits.chunk(n_local), dino_probs.chunk(2))
                      if n_local else global_logits.new_zeros((), dtype=torch.float32))
        # dino_probs is already swapped, so row i of the student pairs with the other view's row i.
        dino_global = 2 * self.dino_loss([global_logits], [dino_probs])
        dino = (dino_local + dino_global) / n_pairs
        # KoLeo within each view (two crops of one image are meant to be close).
        koleo = sum(self.koleo_loss(view) for view in global_cls.chunk(2))
        ibot = self.ibot_patch_loss(ibot_logits, ibot_probs, masks_weight, n_images=global_crops.shape[0])
        total = self.dino_loss_weight * dino + self.koleo_loss_weight * koleo + self.ibot_loss_weight * ibot

        (self.grad_scaler.scale(total) if self.grad_scaler is not None else total).backward()
        return {
            "total_loss": total.item(),
            "dino_local_crops_loss": (dino_local / n_pairs).item(),
            "dino_global_crops_loss": (dino_global / n_pairs).item(),
            "koleo_loss": koleo.item(),
            "ibot_loss": ibot.item(),
            "n_masked_patches": float(n_masked),
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        for name, module in self.student.items():
            student_params = list(unwrap(module).parameters())
            teacher_params = list(self.teacher[name].parameters())
            torch._foreach_mul_(teacher_params, momentum)
            torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    # ------------------------------------------------------------------ optimiser groups

    def get_params_groups(self) -> list[dict[str, Any]]:
        """Student parameters grouped by (lr_multiplier, wd_multiplier, is_last_layer): layer-wise lr
        decay over the backbone's blocks (optim.layerwise_decay; heads and the final norm at 1), patch
        embedding x optim.patch_embed_lr_mult, no weight decay on biases, norms and LayerScale gains,
        and `is_last_layer` on the heads' prototypes (frozen early on), all as DINOv2. Unlike DINOv2,
        the cls/register/mask tokens and position embeddings get no weight decay either, unless
        optim.token_weight_decay is true."""
        decay = float(self.cfg.optim.layerwise_decay)
        patch_embed_mult = float(self.cfg.optim.patch_embed_lr_mult)
        decay_tokens = self.cfg.optim.token_weight_decay
        if not isinstance(decay_tokens, bool):
            raise UserError(f"config: optim.token_weight_decay={decay_tokens!r} must be true or false")
        n_blocks = len(unwrap(self.student["backbone"]).blocks)
        groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
        for module_name, module in self.student.items():
            for name, param in unwrap(module).named_parameters():
                if not param.requires_grad:
                    continue
                lr_mult = 1.0
                if module_name == "backbone":
                    lr_mult = decay ** (n_blocks + 1 - self._layer_id(name, n_blocks))
                    if name.startswith("patch_embed."):
                        lr_mult *= patch_embed_mult
                no_decay = (name.endswith(".bias") or "norm" in name or name.endswith(".gamma")
                            or (name in _EMBEDDING_PARAMS and not decay_tokens))
                key = (lr_mult, 0.0 if no_decay else 1.0, name.startswith("last_layer."))
                group = groups.setdefault(key, {"params": [], "names": [], "lr_multiplier": key[0],
                                                "wd_multiplier": key[1], "is_last_layer": key[2]})
                group["params"].append(param)
                group["names"].append(f"{module_name}.{name}")
        return list(groups.values())

    @staticmethod
    def _layer_id(name: str, n_blocks: int) -> int:
        """0 for the embeddings, i + 1 for block i, n_blocks + 1 for what follows the blocks."""
        if name.startswith("patch_embed.") or name in _EMBEDDING_PARAMS:
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return n_blocks + 1
