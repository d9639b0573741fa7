"""merge_infos builds exactly Gymnasium's vector info layout (VectorEnv._add_info, row by row)."""

from __future__ import annotations

import numpy as np
from gymnasium.vector import VectorEnv

from llm_envs.vector import merge_infos


def _gymnasium_merge(row_infos, rows, num_envs):
    env = VectorEnv.__new__(VectorEnv)
    env.num_envs = num_envs
    merged: dict = {}
    for info, row in zip(row_infos, rows):
        if info:
            merged = env._add_info(merged, info, row)
    return merged


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        else:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            for x, y in zip(a[key], b[key]):
                assert (np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y), key


def test_merge_infos_equals_gymnasium_add_info():
    rng = np.random.default_rng(0)
    infos = []
    for i in range(6):
        info = {"candidate_id": int(rng.integers(100)), "candidate_prob": float(rng.random()),
                "prompt": f"p{i}", "prompt_index": None if i % 3 == 0 else i, "forced_accept": bool(i % 2),
                "weight": np.float32(i)}
        if i in (1, 4):  # an ended episode: extra keys, nested dicts, an ndarray, final_obs
            info.update(response_ids=[1, 2, i], reward_parts={"reward_model": 0.5 * i, "gold": -1.0},
                        final_obs=np.arange(3, dtype=np.float32) + i, vec=np.ones(2) * i,
                        final_info={"response_ids": [i], "episode_stats": {"steps": i}})
        infos.append(info)
    rows = [0, 2, 3, 5, 6, 7]
    infos.insert(2, {})  # a row with no info
    rows.insert(2, 1)
    _assert_same(merge_infos(infos, rows, 8), _gymnasium_merge(infos, rows, 8))
