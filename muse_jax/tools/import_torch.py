"""Imports an official MUSE PyTorch checkpoint as a muse_jax backbone directory (no PyTorch needed).

  python -m muse_jax.tools.import_torch --checkpoint muse-vit_s_16-224.pth --arch vit_s16 --out backbones/muse_vit_s16

The output has the same layout as a pretraining export (`muse_jax.backbone_io`), so evaluation, fine-tuning and
prediction take it unchanged. The checkpoint is read with `torch_format.load` (restricted unpickling: a file with code
in its pickle is refused). The official layout is `{'teacher': {'module.backbone.<key>': tensor, ...}, ...}`; plain
state dicts work too. Conversion is strict (`convert.torch_to_variables`).

`--img_size` (ViTs) sets the input side the position embedding is stored for; by default the checkpoint's own grid
(224 for the released 224 models). `--pos_embed_resize official` (default) reproduces the official evaluation
loader, which always re-interpolates the position embedding; `exact` keeps it bit-identical when the grid does not
change.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
from typing import Any, Sequence

import ml_collections

from muse_jax import cli
from muse_jax.tools import convert, torch_format

ARCHS = ("auto", "vit_s16", "vit_b16", "r50", "tiny", "tiny_r50")


def import_checkpoint(
  checkpoint: str | os.PathLike,
  out: str | os.PathLike,
  *,
  arch: str = "auto",
  img_size: int | None = None,
  key: str | None = None,
  prefix: str | None = None,
  pos_embed_resize: str = "official",
) -> tuple[pathlib.Path, ml_collections.ConfigDict, dict[str, Any]]:
  """Converts `checkpoint` and writes a backbone directory at `out`.

  Args:
    checkpoint: a `torch.save` file (official MUSE release or a plain backbone state dict).
    out: the backbone directory to write (replaced if it exists).
    arch: model variant ('vit_s16', 'vit_b16', 'r50', 'tiny', 'tiny_r50') or 'auto' (from the tensor shapes).
    img_size: input side for the position embedding (ViT; multiple of 16); default: the checkpoint's grid x 16.
      For ResNets it is only recorded in the config (default 224).
    key: checkpoint entry holding the state dict (default: 'teacher', 'state_dict', 'model' or the top level).
    prefix: key prefix of the backbone tensors (default: 'module.backbone.' when present).
    pos_embed_resize: 'official' or 'exact' (see the module docstring).

  Returns:
    `(path, model_cfg, info)`.

  Raises:
    ValueError (`TorchFormatError`, `ConversionError`): unreadable or unsafe file, wrong architecture, strict
      conversion failure (listing missing/unexpected/mis-shaped keys).
  """
  from configs import models as model_configs  # pylint: disable=import-outside-toplevel
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  checkpoint = pathlib.Path(checkpoint)
  if arch not in ARCHS:
    raise ValueError(f"--arch must be one of {ARCHS}; got {arch!r}")
  obj = torch_format.load(checkpoint)
  state_dict, found = convert.extract_state_dict(obj, key=key, prefix=prefix, source=str(checkpoint))
  inferred = convert.infer_variant(state_dict)
  if arch == "auto":
    arch = inferred
  elif arch != inferred:
    raise convert.ConversionError(f"{checkpoint}: --arch {arch} but the tensors are those of {inferred}")
  model_cfg = model_configs.get_config(arch)
  if model_cfg.arch == "vit":
    if img_size is None:
      img_size = math.isqrt(state_dict[convert.POS_EMBED_KEY].shape[1] - 1) * model_cfg.patch_size
  if img_size is not None:
    if img_size <= 0 or img_size % model_cfg.patch_size:
      raise ValueError(f"--img_size must be a positive multiple of {model_cfg.patch_size} for {arch}; got {img_size}")
    model_cfg.img_size = int(img_size)
  variables, info = convert.torch_to_variables(state_dict, model_cfg, pos_embed_resize=pos_embed_resize,
                                               source=str(checkpoint))
  info = {
    "source": "muse_jax.tools.import_torch",
    "checkpoint": str(checkpoint.resolve()),
    "checkpoint_key": found["key"],
    "key_prefix": found["prefix"],
    "skipped_tensors": found["skipped"],
    "arch": arch,
    "img_size": int(model_cfg.img_size),
    **info,
  }
  path = backbone_io.save_backbone(out, model_cfg, variables, extra=info)
  return pathlib.Path(str(path)), model_cfg, info


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog="python -m muse_jax.tools.import_torch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="official MUSE .pth file (or a plain state dict)")
  parser.add_argument("--arch", default="auto", choices=ARCHS, help="model variant (default: from the tensors)")
  parser.add_argument("--out", required=True, help="backbone directory to write")
  parser.add_argument("--img_size", type=int, default=None, help="input side the ViT position embedding is for")
  parser.add_argument("--key", default=None, help="checkpoint entry with the state dict (default: teacher)")
  parser.add_argument("--prefix", default=None, help="backbone key prefix (default: module.backbone.)")
  parser.add_argument("--pos_embed_resize", default="official", choices=convert.POS_EMBED_MODES)
  args = parser.parse_args(argv)
  path, model_cfg, info = import_checkpoint(args.checkpoint, args.out, arch=args.arch, img_size=args.img_size,
                                            key=args.key, prefix=args.prefix, pos_embed_resize=args.pos_embed_resize)
  print(f"wrote {path}: {model_cfg.name}, img_size {model_cfg.img_size}, pos_embed {info['pos_embed']}, "
        f"{info['skipped_tensors']} non-backbone tensors left out")


# A bad or unreadable checkpoint / backbone (ConversionError, TorchFormatError, a bad value) is a user error: one
# line on stderr, exit 2 (`--debug` shows the traceback).
USER_ERRORS = cli.USER_ERROR_TYPES + (convert.ConversionError, torch_format.TorchFormatError, ValueError)

if __name__ == "__main__":
  import sys
  sys.exit(cli.run(main, user_errors=USER_ERRORS))
