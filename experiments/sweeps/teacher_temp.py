"""Teacher temperature and nucleus-head size (spec §7.1: tune these first) on ViT-S/16."""
BASE = "configs/pretrain.py:vit_s16"
RUNS = {
    f"tt{tt}_knu{k}": {"optim.teacher_temp": tt, "heads.nu_out_dim": k}
    for tt in (0.04, 0.07) for k in (4096, 8192, 65536)
}
