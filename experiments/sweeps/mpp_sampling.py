"""Physical-resolution sampling of the views (spec §3.2, §7.3; Table 5 of the paper) on ViT-S/16."""
BASE = "configs/pretrain.py:vit_s16"
RUNS = {
    "uniform_0.25_0.5": {"data.mpp_dist": "uniform"},
    "loguniform_0.25_0.5": {"data.mpp_dist": "loguniform"},
    "discrete_20x_40x": {"data.mpp_dist": "discrete"},
    "fixed_20x": {"data.mpp_range": "(0.5, 0.5)"},
}
