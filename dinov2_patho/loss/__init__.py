"""DINOv2 losses: DINO on the CLS token, iBOT on masked patches, KoLeo regulariser."""

from dinov2_patho.loss.dino_clstoken_loss import DINOLoss
from dinov2_patho.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2_patho.loss.koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss"]
