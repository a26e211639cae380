"""Exports a muse_jax backbone directory to the official MUSE PyTorch key layout (no PyTorch needed).

  python -m muse_jax.tools.export_torch --backbone runs/pretrain/export --out muse_jax-vit_s16.pth

By default the file has the released checkpoints' layout, `{'teacher': {'module.backbone.<key>': tensor}}`, so the
official evaluation code (which reads `torch.load(path)['teacher']` and strips `module.backbone.`) loads it as it is;
`--layout state_dict` writes the bare backbone state dict (`model.load_state_dict(torch.load(path))`). The file loads
with `torch.load(path, weights_only=True)`.

Every BatchNorm's `num_batches_tracked` is written as one value: `--num_batches_tracked`, else the value recorded by
`import_torch` in the backbone's `info.json`, else 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
from typing import Sequence

from muse_jax import cli
from muse_jax.tools import convert, torch_format

LAYOUTS = ("teacher", "state_dict")


def export_backbone(
  backbone: str | os.PathLike,
  out: str | os.PathLike,
  *,
  layout: str = "teacher",
  num_batches_tracked: int | None = None,
) -> pathlib.Path:
  """Writes the backbone at `backbone` (a backbone directory or `random:<variant>`) as a `.pth` file at `out`.

  Args:
    backbone: source for `backbone_io.load_backbone`.
    out: output file.
    layout: 'teacher' (`{'teacher': {'module.backbone.' + key: ...}}`) or 'state_dict' (bare keys).
    num_batches_tracked: value for every BatchNorm counter (default: from `info.json`, else 0).

  Returns:
    The output path.
  """
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
  model_cfg, variables = backbone_io.load_backbone(backbone)
  if num_batches_tracked is None:
    num_batches_tracked = 0
    info_path = pathlib.Path(os.fspath(backbone)) / backbone_io.INFO_FILE
    if info_path.is_file():
      try:
        num_batches_tracked = int(json.loads(info_path.read_text()).get("num_batches_tracked", 0))
      except (ValueError, TypeError) as e:
        raise ValueError(f"{info_path}: unreadable info file ({e})") from e
  state_dict = convert.variables_to_torch(variables, model_cfg, num_batches_tracked=num_batches_tracked,
                                          source=f"backbone {backbone}")
  if layout == "teacher":
    obj = {"teacher": collections.OrderedDict((convert.CHECKPOINT_PREFIX + k, v) for k, v in state_dict.items())}
  else:
    obj = state_dict
  out = pathlib.Path(out)
  torch_format.save(out, obj)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog="python -m muse_jax.tools.export_torch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--backbone", required=True, help="backbone directory (or random:<variant>)")
  parser.add_argument("--out", required=True, help="output .pth file")
  parser.add_argument("--layout", default="teacher", choices=LAYOUTS)
  parser.add_argument("--num_batches_tracked", type=int, default=None)
  args = parser.parse_args(argv)
  path = export_backbone(args.backbone, args.out, layout=args.layout, num_batches_tracked=args.num_batches_tracked)
  print(f"wrote {path} ({args.layout} layout)")


# A bad or unreadable checkpoint / backbone (ConversionError, TorchFormatError, a bad value) is a user error: one
# line on stderr, exit 2 (`--debug` shows the traceback).
USER_ERRORS = cli.USER_ERROR_TYPES + (convert.ConversionError, torch_format.TorchFormatError, ValueError)

if __name__ == "__main__":
  import sys
  sys.exit(cli.run(main, user_errors=USER_ERRORS))
