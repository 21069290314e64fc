"""Where each backbone's release file is published: its authors' own URL, per arch.

The addresses are the ones the authors' READMEs link (facebookresearch/dino README and hubconf.py,
facebookresearch/dinov2 README and dinov2/hub/backbones.py, bytedance/ibot README, facebookresearch/msn
README, facebookresearch/mae README), for the weights the README's "Checkpoints" table names: the
backbone-only files (DINO, DINOv2, MAE), iBOT's teacher backbone, MSN's full checkpoint (its target
encoder is read). The stand-in archs (`dino_vit_tiny_*`) have no release and no entry here.

No sizes are listed: the authors publish none, so a download is checked against the size the server
declares (utils/runtime/download.py).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    arch: str
    url: str
    size: int | None = None  # bytes, when known independently of the server

    @property
    def file_name(self):
        """The file's name as its authors ship it."""
        return self.url.rsplit("/", 1)[1]


_FAIR = "https://dl.fbaipublicfiles.com"
_IBOT = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"

RELEASES = {release.arch: release for release in (
    Release("dino_vit_small_8", f"{_FAIR}/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    Release("dino_vit_small_16", f"{_FAIR}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    Release("dino_vit_base_8", f"{_FAIR}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    Release("dino_vit_base_16", f"{_FAIR}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    Release("dinov2_vit_small_14", f"{_FAIR}/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"),
    Release("dinov2_vit_base_14", f"{_FAIR}/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"),
    Release("ibot_vit_small_16", f"{_IBOT}/vits_16/checkpoint_teacher.pth"),
    Release("ibot_vit_base_16", f"{_IBOT}/vitb_16/checkpoint_teacher.pth"),
    Release("msn_vit_small_16", f"{_FAIR}/msn/vits16_800ep.pth.tar"),
    Release("msn_vit_base_16", f"{_FAIR}/msn/vitb16_600ep.pth.tar"),
    Release("mae_vit_base_16", f"{_FAIR}/mae/pretrain/mae_pretrain_vit_base.pth"),
)}
