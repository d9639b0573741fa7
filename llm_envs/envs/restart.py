"""What an autoreset inside a core's step needs: which rows start over, their RNGs and options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Restart:
    """Rows to start a new episode on, with each row's prompt RNG and reset options."""

    rows: list[int]
    rngs: list[np.random.Generator]
    options: list[dict[str, Any] | None]
