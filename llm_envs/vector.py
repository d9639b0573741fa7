"""Vector views of the batched MDP cores: a native Gymnasium `VectorEnv` and an SB3 `VecEnv`.

Both drive one core with N rows, so a step of N envs is one batched LM forward (not N
single-env forwards as `SyncVectorEnv`/`SubprocVecEnv` would do). Row i, seeded with
`seed + i`, follows the same trajectory as a single env seeded with `seed + i`.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.utils.seeding import np_random
from gymnasium.vector import AutoresetMode, VectorEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from llm_envs.envs.restart import Restart

# env id -> "module:CoreClass" (the batched implementation behind the id)
CORES: dict[str, str] = {
    "llm_envs/TokenAccept-v0": "llm_envs.envs.token_accept:TokenAcceptCore",
    "llm_envs/TokenChoice-v0": "llm_envs.envs.token_choice:TokenChoiceCore",
}


def _core_class(env_id: str) -> type:
    if env_id not in CORES:
        import difflib

        close = difflib.get_close_matches(env_id, list(CORES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"env id {env_id!r} has no batched core; expected one of {sorted(CORES)}.{hint}")
    module, name = CORES[env_id].split(":")
    return getattr(importlib.import_module(module), name)


def _rngs(seed: int | None, n: int) -> list[np.random.Generator]:
    return [np_random(None if seed is None else seed + i)[0] for i in range(n)]


class LMVectorEnv(VectorEnv):
    """A Gymnasium `VectorEnv` over a batched core (autoreset: NEXT_STEP or SAME_STEP)."""

    def __init__(
        self,
        core_cls: type,
        num_envs: int,
        *,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        max_episode_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        mode = AutoresetMode(autoreset_mode)
        if mode == AutoresetMode.DISABLED:
            raise ValueError("autoreset_mode=DISABLED is not supported; use NEXT_STEP or SAME_STEP.")
        if max_episode_steps is not None:
            kwargs.setdefault("max_steps", max_episode_steps)
        self.core = core_cls(num_envs, **kwargs)
        self.num_envs = num_envs
        self.autoreset_mode = mode
        self.metadata = {"autoreset_mode": mode, "render_modes": []}
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._rngs = _rngs(None, num_envs)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._options: dict[str, Any] | None = None
        self._started = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rngs = _rngs(seed, self.num_envs)
        self._options = options
        rows = list(range(self.num_envs))
        obs, row_infos = self.core.reset_rows(rows, self._rngs, [options] * self.num_envs)
        self._needs_reset[:] = False
        self._started = True
        return obs, self._merge(row_infos, rows)

    def step(self, actions: Any):
        if not self._started:
            raise RuntimeError("step() called before reset(); call reset() first.")
        if getattr(self.core, "supports_restart", False):
            return self._step_with_restarts(actions)
        resetting = np.flatnonzero(self._needs_reset).tolist()
        obs, rewards, terminated, truncated, infos = self.core.step(actions, ~self._needs_reset)
        if resetting:  # NEXT_STEP: the rows that ended last step start over; their action is ignored
            reset_obs, reset_infos = self._reset(resetting)
            obs[resetting] = reset_obs
            rewards[resetting], terminated[resetting], truncated[resetting] = 0.0, False, False
            for row, info in zip(resetting, reset_infos):
                infos[row] = info
        done = np.flatnonzero(terminated | truncated).tolist()
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._needs_reset[:] = False
            self._needs_reset[done] = True
        elif done:  # SAME_STEP: start over at once; the last observation goes to final_obs
            reset_obs, reset_infos = self._reset(done)
            for i, row in enumerate(done):
                infos[row] = {**reset_infos[i], "final_obs": obs[row].copy(), "final_info": infos[row]}
            obs[done] = reset_obs
        return obs, rewards, terminated, truncated, self._merge(infos, range(self.num_envs))

    def _step_with_restarts(self, actions: Any):
        """The same step, with autoresets done inside the core's step so the new rows share its
        batched forward (cores with `supports_restart`)."""
        resetting = np.flatnonzero(self._needs_reset).tolist()
        restart = Restart(resetting, [self._rngs[r] for r in resetting], [self._options] * len(resetting))
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        obs, rewards, terminated, truncated, infos = self.core.step(
            actions, ~self._needs_reset, restart=restart, restart_done=self._restart if same_step else None)
        done = np.flatnonzero(terminated | truncated).tolist()
        self._needs_reset[:] = False
        if not same_step:
            self._needs_reset[done] = True
        return obs, rewards, terminated, truncated, self._merge(infos, range(self.num_envs))

    def _restart(self, rows: list[int]) -> Restart:
        return Restart(rows, [self._rngs[r] for r in rows], [self._options] * len(rows))

    def action_masks(self) -> np.ndarray:
        """[num_envs, n_actions] bool (for rows about to reset: all actions legal)."""
        masks = self.core.action_masks()
        masks[self._needs_reset] = True
        return masks

    def _reset(self, rows: list[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        return self.core.reset_rows(rows, [self._rngs[r] for r in rows], [self._options] * len(rows))

    def _merge(self, row_infos: Sequence[dict[str, Any]], rows: Sequence[int]) -> dict[str, Any]:
        return merge_infos(row_infos, rows, self.num_envs)


def merge_infos(row_infos: Sequence[dict[str, Any]], rows: Sequence[int], num_envs: int) -> dict[str, Any]:
    """Gymnasium's vector info layout (what `VectorEnv._add_info` builds row by row: `info[key]`
    an array over envs, `info["_" + key]` its mask; nested dicts recursively; `final_obs` an
    object array), built key by key: one array write per key instead of several dict and array
    operations per row and key, which cost ~1 ms per step at N=64."""
    columns: dict[str, tuple[list[int], list[Any]]] = {}
    for info, row in zip(row_infos, rows):
        for key, value in info.items():
            at, values = columns.setdefault(key, ([], []))
            at.append(row)
            values.append(value)
    merged: dict[str, Any] = {}
    for key, (at, values) in columns.items():
        first = values[0]
        if key != "final_obs" and isinstance(first, dict):
            merged[key] = merge_infos(values, at, num_envs)
        elif key != "final_obs" and (type(first) in (int, float, bool) or isinstance(first, np.number)):
            merged[key] = np.zeros(num_envs, dtype=type(first))
            merged[key][at] = values
        elif key != "final_obs" and isinstance(first, np.ndarray):
            merged[key] = np.zeros((num_envs, *first.shape), dtype=first.dtype)
            merged[key][at] = values
        else:  # objects (lists, str, None, final_obs): one element each, never broadcast
            merged[key] = np.full(num_envs, fill_value=None, dtype=object)
            for row, value in zip(at, values):
                merged[key][row] = value
        mask = np.zeros(num_envs, dtype=np.bool_)
        mask[at] = True
        merged[f"_{key}"] = mask
    return merged


class LMSb3VecEnv(VecEnv):
    """An SB3 `VecEnv` over a batched core: same-step autoreset, `terminal_observation` and
    `TimeLimit.truncated` in infos, and `env_method("action_masks")` -> one (N, n_actions) array
    (what sb3-contrib's MaskablePPO reads)."""

    def __init__(self, core_cls: type, num_envs: int, **kwargs: Any) -> None:
        self.core = core_cls(num_envs, **kwargs)
        self.render_mode: str | None = None
        super().__init__(num_envs, self.core.observation_space, self.core.action_space)
        self._rngs = _rngs(None, num_envs)
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        if any(seed is not None for seed in self._seeds):
            self._rngs = [np_random(seed)[0] for seed in self._seeds]
        rows = list(range(self.num_envs))
        options = [opt or None for opt in self._options]
        obs, infos = self.core.reset_rows(rows, self._rngs, options)
        self.reset_infos = infos
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        if getattr(self.core, "supports_restart", False):
            return self._step_with_restarts()
        obs, rewards, terminated, truncated, infos = self.core.step(self._actions)
        dones = terminated | truncated
        done_rows = np.flatnonzero(dones).tolist()
        for row in done_rows:
            infos[row]["terminal_observation"] = obs[row].copy()
            infos[row]["TimeLimit.truncated"] = bool(truncated[row] and not terminated[row])
        if done_rows:
            reset_obs, reset_infos = self.core.reset_rows(
                done_rows, [self._rngs[r] for r in done_rows], [None] * len(done_rows))
            obs[done_rows] = reset_obs
            for row, info in zip(done_rows, reset_infos):
                self.reset_infos[row] = info
        return obs, rewards.astype(np.float32), dones, infos

    def _step_with_restarts(self):
        """Same-step autoreset inside the core's step: the new rows share its batched forward."""
        obs, rewards, terminated, truncated, infos = self.core.step(
            self._actions, restart_done=lambda rows: Restart(rows, [self._rngs[r] for r in rows], [None] * len(rows)))
        dones = terminated | truncated
        for row in np.flatnonzero(dones).tolist():
            new_info = infos[row]
            infos[row] = {**new_info.pop("final_info"), "terminal_observation": new_info.pop("final_obs"),
                          "TimeLimit.truncated": bool(truncated[row] and not terminated[row])}
            self.reset_infos[row] = new_info
        return obs, rewards.astype(np.float32), dones, infos

    def action_masks(self) -> np.ndarray:
        return self.core.action_masks()

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        target = self if attr_name in ("action_masks", "render_mode") else self.core
        value = getattr(target, attr_name)  # AttributeError when missing, as SB3 expects
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.core, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> Any:
        if method_name == "action_masks":
            masks = self.action_masks()
            return masks[list(self._get_indices(indices))]
        return [getattr(self.core, method_name)(*args, **kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def make_vector_env(env_id: str, num_envs: int, **kwargs: Any) -> LMVectorEnv:
    """The Gymnasium vector env for `env_id` (what `gym.make_vec` calls)."""
    return LMVectorEnv(_core_class(env_id), num_envs, **kwargs)


def make_sb3_vec_env(env_id: str, num_envs: int, **kwargs: Any) -> LMSb3VecEnv:
    """An SB3 `VecEnv` of `num_envs` rows on one engine, ready for MaskablePPO."""
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs}; expected at least 1.")
    return LMSb3VecEnv(_core_class(env_id), num_envs, **kwargs)


def token_accept_vector_env(num_envs: int = 1, **kwargs: Any) -> LMVectorEnv:
    """vector_entry_point of llm_envs/TokenAccept-v0."""
    return make_vector_env("llm_envs/TokenAccept-v0", num_envs, **kwargs)


def token_choice_vector_env(num_envs: int = 1, **kwargs: Any) -> LMVectorEnv:
    """vector_entry_point of llm_envs/TokenChoice-v0 (adds `candidate_rewards()` and friends)."""
    from llm_envs.envs.token_choice import TokenChoiceCore, TokenChoiceVectorEnv

    return TokenChoiceVectorEnv(TokenChoiceCore, num_envs, **kwargs)
