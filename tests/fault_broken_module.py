"""A task module that fails to import (fault drill fixture: MIXTURE_OR_TASK_MODULE)."""
from __future__ import annotations

import t5xlike_no_such_dependency  # noqa: F401
