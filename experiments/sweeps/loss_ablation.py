"""The paper's loss ablation (image only / NuLo only / both) on ViT-S/16 (spec §3.5; Table 4 of the paper)."""
BASE = "configs/pretrain.py:vit_s16"
RUNS = {
    "image_only": {"loss.w_nu": 0.0},
    "nulo_only": {"loss.w_image": 0.0},
    "both": {},
}
