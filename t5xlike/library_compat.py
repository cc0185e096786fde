"""Every use of a private name of another library (gin, seqio, TFDS), in one place.

Each function says which public API is missing. When a library adds it, only
this module changes; `tests/test_layering.py` checks that no other module of
the package reads a private name of a library.
"""
from __future__ import annotations

import gin


def gin_defined_macros() -> set[str]:
  """The macros (`NAME = value` without a dot) bound by the gin files parsed so far.

  Missing public API: gin has no query for the bindings of a configurable;
  it keeps macros as bindings of the configurable `gin.macro`, scoped by name,
  in `gin.config._CONFIG`.
  """
  return {scope for (scope, selector) in gin.config._CONFIG  # noqa: SLF001
          if selector == "gin.macro"}
