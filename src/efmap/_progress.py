"""Progress reporting through tqdm or a user callback."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from efmap._typing import ProgressType
from efmap._warnings import EfmapWarning


class Progress:
    """A sink for ``(done, total)`` updates: a tqdm bar, a callback, or nothing."""

    def __init__(self, progress: ProgressType, total: int, description: str) -> None:
        self.total = total
        self.done = 0
        self._callback: Callable[[int, int], None] | None = None
        self._bar: Any = None
        if progress is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                warnings.warn(
                    "progress=True needs tqdm, which is not installed; install it with "
                    "`pip install efmap[progress]`. Continuing without a progress bar.",
                    EfmapWarning,
                    stacklevel=3,
                )
            else:
                self._bar = tqdm(total=total, desc=description, unit="fwd")
        elif callable(progress):
            self._callback = progress
        elif progress is not False and progress is not None:
            raise TypeError(f"Expected `progress` to be a bool or a callable (done, total), but got {progress!r}.")

    def advance(self, count: int) -> None:
        """Record ``count`` more units of finished work."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        """Close the bar, if any."""
        if self._bar is not None:
            self._bar.close()
