"""How a step that can take more than a few seconds shows its progress: the one owner of it.

On a terminal: a tqdm bar on stderr. Elsewhere (a log file, CI, a notebook's captured output):
a log line every 30 s, so a long step is never silent. `mmtag -q` (the "mmtag" logger above
INFO) turns both off; warnings and errors still show.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

log = logging.getLogger("mmtag.progress")
LOG_EVERY_S = 30.0


def quiet() -> bool:
    return not logging.getLogger("mmtag").isEnabledFor(logging.INFO)


def on_terminal() -> bool:
    """Whether bars are drawn: stderr is a terminal and -q was not given."""
    return sys.stderr.isatty() and not quiet()


def progress(iterable: Iterable, total: int | None, desc: str, unit: str = "batch",
             bar: bool | None = None) -> Iterable:
    """`iterable`, showing its progress: a bar when `bar` (None: on a terminal), else a log
    line every 30 s; nothing under -q."""
    if quiet():
        return iterable
    if on_terminal() if bar is None else bar:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return _logged(iterable, total, desc, unit)


def _logged(iterable: Iterable, total: int | None, desc: str, unit: str) -> Iterator:
    start = last = time.monotonic()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            of = f"/{total} ({100 * i / total:.0f} %)" if total else ""
            log.info("%s: %d%s %s(es), %.0f s", desc, i, of, unit, now - start)
