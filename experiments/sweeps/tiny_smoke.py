"""A minutes-long CPU sweep (tiny model, bundled sample): checks the sweep machinery and the three loss modes."""
BASE = "configs/pretrain.py:tiny"
_COMMON = {"total_steps": 30, "progress_bar": False}
RUNS = {
    "image_only": {**_COMMON, "loss.w_nu": 0.0},
    "nulo_only": {**_COMMON, "loss.w_image": 0.0},
    "both": dict(_COMMON),
}
