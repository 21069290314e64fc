"""Where each backbone's release file is published: its authors' own URL, per arch, or, for DINOv3, where
to request it.

The addresses are the ones the authors' READMEs link (facebookresearch/dino README and hubconf.py,
facebookresearch/dinov2 README and dinov2/hub/backbones.py, bytedance/ibot README, facebookresearch/msn
README, facebookresearch/mae README), for the weights docs/backbones.md's "Checkpoints" table names: the
backbone-only files (DINO, DINOv2 with and without registers, MAE), iBOT's teacher backbone, MSN's full
checkpoint (its target encoder is read). The stand-in archs (`dino_vit_tiny_*`) have no release and no
entry here.

No sizes are listed: the authors publish none, so a download is checked against the size the server
declares (utils/runtime/download.py).

DINOv3's weights (facebookresearch/dinov3 README) are handed out only to those who accept Meta's DINOv3
license: its download page emails signed links to the files, whose names dinov3/hub/backbones.py spells
(`dinov3_<arch>_pretrain_lvd1689m-<hash>.pth`). Nothing can download them unasked, so they are
`GATED_RELEASES`: a file saved by hand is found by its arch or official name, and a missing one is a
one-line request (`GatedRelease.request`). Their Hugging Face repositories (also gated) hold the same
weights in the Transformers library's layout, which this project does not read.
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
    Release("dinov2_reg_vit_small_14", f"{_FAIR}/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"),
    Release("dinov2_reg_vit_base_14", f"{_FAIR}/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"),
    Release("ibot_vit_small_16", f"{_IBOT}/vits_16/checkpoint_teacher.pth"),
    Release("ibot_vit_base_16", f"{_IBOT}/vitb_16/checkpoint_teacher.pth"),
    Release("msn_vit_small_16", f"{_FAIR}/msn/vits16_800ep.pth.tar"),
    Release("msn_vit_base_16", f"{_FAIR}/msn/vitb16_600ep.pth.tar"),
    Release("mae_vit_base_16", f"{_FAIR}/mae/pretrain/mae_pretrain_vit_base.pth"),
)}


DINOV3_REQUEST_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


@dataclass(frozen=True)
class GatedRelease:
    arch: str
    file_name: str  # as the emailed link and dinov3/hub/backbones.py name it
    hugging_face: str  # the gated Hugging Face repository of the same weights (Transformers layout)

    def request(self, saved_as):
        """The one line that says how to get the file by hand and where to save it (`saved_as`: the places
        looked in, in order)."""
        places = " or ".join(str(place) for place in saved_as)
        return (f"the {self.arch} weights ({self.file_name}) are handed out after accepting Meta's DINOv3 "
                f"license: request them at {DINOV3_REQUEST_PAGE} (the Hugging Face repository "
                f"{self.hugging_face}, also gated, holds them in the Transformers layout, which this project "
                f"does not read), then save {self.file_name} as {places}")


GATED_RELEASES = {release.arch: release for release in (
    GatedRelease("dinov3_vit_small_16", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
                 "facebook/dinov3-vits16-pretrain-lvd1689m"),
    GatedRelease("dinov3_vit_small_plus_16", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
                 "facebook/dinov3-vits16plus-pretrain-lvd1689m"),
    GatedRelease("dinov3_vit_base_16", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
                 "facebook/dinov3-vitb16-pretrain-lvd1689m"),
    GatedRelease("dinov3_vit_large_16", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
                 "facebook/dinov3-vitl16-pretrain-lvd1689m"),
)}

# Official file names that name their arch beyond doubt, recognised as it (registry.resolve_arch): those of
# DINOv2 with registers and of DINOv3, whose users keep the name the authors give them.
OFFICIAL_FILE_NAMES = {
    **{arch: RELEASES[arch].file_name for arch in ("dinov2_reg_vit_small_14", "dinov2_reg_vit_base_14")},
    **{arch: release.file_name for arch, release in GATED_RELEASES.items()},
}
