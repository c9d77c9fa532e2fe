"""Small helpers shared across the package."""
from __future__ import annotations

import functools
import warnings


@functools.lru_cache(maxsize=None)
def _warned(message: str, category: type[Warning]) -> bool:
  warnings.warn(message, category, stacklevel=4)
  return True


def warn_once(message: str, category: type[Warning] = UserWarning) -> None:
  """Warns with `message` the first time this process sees it; later calls with it are silent."""
  _warned(message, category)
