"""Wall-clock deadlines for the long-running experiment drivers (`aot_table.py --stop_at`, `study.py --deadline`)."""

from __future__ import annotations

import datetime as dt


def next_utc(hhmm: str, flag: str = "--stop_at", now: dt.datetime | None = None) -> float:
  """The next UTC time `HH:MM` as a POSIX timestamp: today, or tomorrow when that time of day has passed.

  A run started at 22:40 with a 01:10 deadline stops after midnight, not at once. A malformed value exits with a
  message naming `flag`.
  """
  try:
    hh, mm = (int(x) for x in hhmm.split(":"))
    if not (0 <= hh < 24 and 0 <= mm < 60):
      raise ValueError
  except ValueError:
    raise SystemExit(f"{flag}: expected UTC HH:MM (e.g. 01:10), got {hhmm!r}") from None
  now = now or dt.datetime.now(dt.timezone.utc)
  t = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
  if t <= now:
    t += dt.timedelta(days=1)
  return t.timestamp()
