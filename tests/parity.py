"""Shared check of the vector-row == single-env parity tests (SAME_STEP autoreset)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pytest


def same_step_rows_match_singles(step: tuple, singles: Sequence[Any], actions: np.ndarray, atol: float = 1e-5) -> int:
    """Step each single env with its row's action and check the vector step `step` against them:
    done flags, rewards, the ended rows' `final_obs` / `final_info`, and every row's observation (a
    single env that ended is reset, as SAME_STEP does). Returns how many rows ended."""
    obs, rewards, terminated, truncated, infos = step
    ended = 0
    for i, env in enumerate(singles):
        last, reward, te, tr, info = env.step(int(actions[i]))
        assert (terminated[i], truncated[i]) == (te, tr) and rewards[i] == pytest.approx(reward, abs=atol)
        if te or tr:
            ended += 1
            np.testing.assert_allclose(infos["final_obs"][i], last, atol=atol)
            assert list(infos["final_info"]["response_ids"][i]) == info["response_ids"]
            last, _ = env.reset()
        np.testing.assert_allclose(obs[i], last, atol=atol)
    return ended
