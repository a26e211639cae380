"""Shared assertion for the one-line user errors of the CLIs (`muse_jax.cli`)."""


def one_error_line(capsys, *needles):
  """The captured stderr is exactly one `error: ...` line containing every needle; returns it."""
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  for n in needles:
    assert n in err[0], (n, err[0])
  return err[0]
