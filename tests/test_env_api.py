"""The env API every face shares: params dataclasses, signatures, unknown keywords, the factories'
methods, atomic steps, and which modules an import pulls in."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from parity import same_step_rows_match_singles

import llm_envs
from llm_envs.envs.params import TokenAcceptParams, TokenChoiceParams, params_fields
from llm_envs.envs.token_accept import TokenAcceptCore, TokenAcceptEnv
from llm_envs.envs.token_choice import TokenChoiceCore, TokenChoiceEnv
from llm_envs.vector import make_vector_env

ROOT = Path(__file__).resolve().parents[1]
ENVS = [("llm_envs/TokenAccept-v0", TokenAcceptEnv, TokenAcceptCore, TokenAcceptParams),
        ("llm_envs/TokenChoice-v0", TokenChoiceEnv, TokenChoiceCore, TokenChoiceParams)]
ALL_ROW_METHODS = {name for _, _, core, _ in ENVS for name in core.row_methods}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world_kwargs(test_world):
    return {"lm": test_world.lm_dir, "reward": test_world.rm_dir, "prompts": test_world.train_prompts[:50],
            "device": "cpu", "max_new_tokens": 4}


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize("env_id, env_class, core_class, params_class", ENVS)
def test_params_are_the_one_source_of_defaults(env_id, env_class, core_class, params_class):
    params = params_class()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_new_tokens = 1
    card = inspect.getdoc(env_class)
    arguments = card[card.index("## Arguments"):card.index("## Version History")]
    for name, _, default, text in params_fields(params_class):
        assert text, f"{params_class.__name__}.{name} has no help"
        assert f"- `{name}={default!r}`: {text}." in arguments
        for face in (env_class, core_class, llm_envs.vector.vector_env_class(core_class)):
            parameter = inspect.signature(face).parameters[name]
            assert parameter.default == default and parameter.kind is inspect.Parameter.KEYWORD_ONLY
    for face in (env_class, core_class):
        assert {"lm", "reward", "prompts", "params"} <= set(inspect.signature(face).parameters)
    assert "{params}" not in card


@pytest.mark.parametrize("params_class, kwargs, match", [
    (TokenAcceptParams, {"p_t": 1.5}, r"p_t=1.5; expected .*0.01"),
    (TokenAcceptParams, {"top_k": 0}, r"top_k=0; expected a positive int"),
    (TokenAcceptParams, {"max_rejections": -1}, r"max_rejections=-1; expected"),
    (TokenAcceptParams, {"max_steps": 0}, r"max_steps=0; expected"),
    (TokenAcceptParams, {"obs_mode": "prefx"}, r"obs_mode='prefx'; expected .*Did you mean 'prefix'"),
    (TokenAcceptParams, {"rejection_cost": float("nan")}, r"rejection_cost=nan; expected a finite number"),
    (TokenAcceptParams, {"max_new_tokens": True}, r"max_new_tokens=True; expected a positive int"),
    (TokenChoiceParams, {"k": 2.5}, r"k=2.5; expected a positive int"),
    (TokenChoiceParams, {"dense_reward": "yes"}, r"dense_reward='yes'; expected True or False"),
    (TokenChoiceParams, {"temperature": -1.0}, r"temperature=-1.0; expected a positive number"),
    (TokenChoiceParams, {"hidden_layer": "last"}, r"hidden_layer='last'; expected an int"),
])
def test_bad_params_name_the_value_the_expectation_and_the_fix(params_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        params_class(**kwargs)


def test_numpy_ints_are_accepted_as_ints():
    assert TokenChoiceParams(k=np.int64(4)).k == 4 and type(TokenChoiceParams(k=np.int64(4)).k) is int


@pytest.mark.parametrize("env_id", [env_id for env_id, *_ in ENVS])
def test_unknown_keyword_says_did_you_mean(env_id):
    # Raised before any model is loaded: no world needed.
    with pytest.raises(TypeError, match="Did you mean 'max_new_tokens'"):
        gym.make(env_id, max_new_token=4)
    with pytest.raises(ValueError, match="Did you mean 'prompts'"):
        make_vector_env(env_id, 2, promts=["hi"])
    with pytest.raises(TypeError, match="expected a "):
        gym.make(env_id, params={"max_new_tokens": 4})


def test_params_object_and_keywords_through_make_and_make_vec(world_kwargs):
    env = gym.make("llm_envs/TokenAccept-v0", params=TokenAcceptParams(p_t=0.001, top_p=0.8), **world_kwargs)
    assert env.unwrapped.params == TokenAcceptParams(p_t=0.001, top_p=0.8, max_new_tokens=4)
    venv = gym.make_vec("llm_envs/TokenAccept-v0", num_envs=2, p_t=0.001, **world_kwargs)
    assert venv.params.p_t == 0.001 and venv.core.max_new_tokens == 4
    assert venv.core.max_steps == 32  # max_steps=None: 8 * max_new_tokens


# ----------------------------------------------------------------------------- every factory, same methods


@pytest.mark.parametrize("env_id, env_class, core_class, params_class", ENVS)
def test_every_factory_gives_the_same_methods(world_kwargs, env_id, env_class, core_class, params_class):
    n, seed = 2, 3
    single = gym.make(env_id, **world_kwargs)
    faces = {"gym.make_vec": gym.make_vec(env_id, num_envs=n, **world_kwargs),
             "make_vector_env": make_vector_env(env_id, n, **world_kwargs),
             "make_sb3_vec_env": llm_envs.make_sb3_vec_env(env_id, n, **world_kwargs)}
    expected = set(core_class.row_methods)
    assert {m for m in ALL_ROW_METHODS if hasattr(single.unwrapped, m)} == expected
    for name, face in faces.items():
        assert {m for m in ALL_ROW_METHODS if hasattr(face, m)} == expected, name
        assert isinstance(face.core, core_class) and face.params == single.unwrapped.params, name
    single.reset(seed=seed)
    for name, face in faces.items():
        if name == "make_sb3_vec_env":
            face.seed(seed)
            face.reset()
        else:
            face.reset(seed=seed)
    for method in core_class.row_methods:
        row0 = getattr(single.unwrapped, method)()
        for name, face in faces.items():
            batch = getattr(face, method)()
            assert batch.shape == (n, *row0.shape), (name, method)
            np.testing.assert_allclose(batch[0], row0, atol=1e-5, err_msg=f"{name}.{method}")
        per_env = faces["make_sb3_vec_env"].env_method(method, indices=[1])
        np.testing.assert_allclose(per_env[0], getattr(faces["make_vector_env"], method)()[1], atol=1e-5)
    masks = faces["make_sb3_vec_env"].env_method("action_masks")
    assert masks.shape == (n, single.action_space.n)


# ----------------------------------------------------------------------------- steps


@pytest.mark.parametrize("env_id, bad_action", [("llm_envs/TokenAccept-v0", 2), ("llm_envs/TokenChoice-v0", 10)])
def test_a_step_that_raises_changes_no_row(world_kwargs, env_id, bad_action):
    venv = make_vector_env(env_id, 3, **world_kwargs)
    venv.reset(seed=0)
    core = venv.core
    before = [dataclasses.replace(state, response=list(state.response)) for state in core.rows]
    forwards, masks = core.engine.forward_calls, venv.action_masks()
    with pytest.raises(ValueError, match="env 2: action .* outside the action space"):
        venv.step(np.array([0, 0, bad_action]))  # rows 0 and 1 are legal and come first
    assert core.engine.forward_calls == forwards
    for old, new in zip(before, core.rows):
        assert (old.response, old.steps, old.forced, old.live) == (new.response, new.steps, new.forced, new.live)
    assert (venv.action_masks() == masks).all()
    venv.step(np.zeros(3, dtype=int))  # and the env steps on normally


def test_token_choice_same_step_autoreset_rows_equal_single_envs(world_kwargs):
    """TokenChoice autoresets inside the core's step too: SAME_STEP rows match single envs."""
    n, seed, env_id = 2, 5, "llm_envs/TokenChoice-v0"
    kwargs = {**world_kwargs, "max_new_tokens": 3, "dense_reward": True}
    venv = make_vector_env(env_id, n, autoreset_mode="SameStep", **kwargs)
    singles = [gym.make(env_id, **kwargs) for _ in range(n)]
    obs, _ = venv.reset(seed=seed)
    for i, env in enumerate(singles):
        np.testing.assert_allclose(obs[i], env.reset(seed=seed + i)[0], atol=1e-5)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(8):
        masks = venv.action_masks()
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        ended += same_step_rows_match_singles((obs, rewards, terminated, truncated, infos), singles, actions)
    assert ended >= 4


# ----------------------------------------------------------------------------- imports


def _fresh_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_params_import_nothing_heavy_and_envs_do_not_import_vector():
    _fresh_python(
        "import sys\n"
        "from llm_envs.envs.params import TokenAcceptParams, TokenChoiceParams\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "import llm_envs.envs.token_accept, llm_envs.envs.token_choice\n"
        "assert not [m for m in sys.modules if m.startswith('llm_envs.vector')]\n"
    )


def test_make_vec_does_not_import_stable_baselines3(world_kwargs):
    kwargs = {**world_kwargs, "lm": str(world_kwargs["lm"]), "reward": str(world_kwargs["reward"]),
              "prompts": list(world_kwargs["prompts"][:4])}
    _fresh_python(
        "import sys\nimport gymnasium as gym\nimport llm_envs\n"
        f"venv = gym.make_vec('llm_envs/TokenChoice-v0', num_envs=2, **{kwargs!r})\n"
        "venv.reset(seed=0)\nvenv.step([0, 0])\n"
        "assert 'stable_baselines3' not in sys.modules, 'gym.make_vec imported stable_baselines3'\n"
        "llm_envs.make_sb3_vec_env('llm_envs/TokenChoice-v0', 2, **" + repr(kwargs) + ")\n"
        "assert 'stable_baselines3' in sys.modules\n"
    )


@pytest.fixture(scope="module")
def twins(world_kwargs):
    """Two 4-env vector envs per env id, built once (one LM load per env) and reset by each test."""
    built: dict[str, tuple] = {}

    def get(env_id: str) -> tuple:
        if env_id not in built:
            from llm_envs.task import build_context

            ctx = build_context(**{k: v for k, v in world_kwargs.items() if k != "max_new_tokens"})
            built[env_id] = tuple(make_vector_env(env_id, 4, context=ctx, max_new_tokens=4) for _ in range(2))
        return built[env_id]

    return get


@pytest.mark.parametrize("env_id", [env_id for env_id, *_ in ENVS])
@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 2), dtype=np.int64), r"shape \(2, 2\); expected shape \(4,\)"),  # never reshaped into 4 actions
    (np.zeros(3, dtype=np.int64), r"shape \(3,\); expected shape \(4,\)"),
    (["1", "0", "0", "0"], r"env 0: action '1' \(str\) is outside the action space: not an integer"),
    (np.array([0.0, 1.0, 0.0, 0.0]), r"env 0: action .*0\.0\) \(float64\) is outside the action space: not an"),
    ([0, 0, True, 0], r"env 2: action True \(bool\) is outside the action space: not an integer"),
])
def test_actions_are_checked_as_a_whole_and_a_bad_call_changes_nothing(twins, env_id, bad, match):
    """The next valid step after a refused one gives what it would have given had the bad call never
    happened (checked against a twin env stepped without it)."""
    venv, twin = twins(env_id)
    venv.reset(seed=3), twin.reset(seed=3)
    with pytest.raises(ValueError, match=match):
        venv.step(bad)
    for step in range(3):
        actions = np.array([step % 2, 0, 1, 0]) if env_id.endswith("TokenAccept-v0") else np.array([0, 1, 0, 2])
        got, want = venv.step(actions), twin.step(actions)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        assert (got[1] == want[1]).all() and (got[2] == want[2]).all() and (got[3] == want[3]).all()
        assert got[4].keys() == want[4].keys() and list(got[4]["position"]) == list(want[4]["position"])


def test_the_single_env_takes_integer_scalars_only(world_kwargs):
    env = TokenAcceptEnv(**world_kwargs)
    env.reset(seed=0)
    for good in (0, np.int64(0), np.array(0)):
        env.step(good)
    for bad, match in ((np.array([[0]]), "not an integer"), ("1", r"'1' \(str\) is outside the action space: not an"),
                       (1.0, "not an integer"), (2, "outside the action space")):
        with pytest.raises(ValueError, match=match):
            env.step(bad)


@pytest.mark.parametrize("core_class, kwargs, match", [
    (TokenChoiceCore, {"k": 10**6}, r"k=1000000 exceeds the LM's vocabulary of \d+ tokens"),
    (TokenAcceptCore, {"top_k": 10**6}, r"top_k=1000000 exceeds the LM's vocabulary"),
    (TokenAcceptCore, {"max_new_tokens": 10**4}, r"max_new_tokens=10000 leaves no room for a prompt"),
    (TokenAcceptCore, {"hidden_layer": 99}, r"hidden_layer=99 is not a hidden state of this \d+-layer LM"),
])
def test_sizes_are_bounded_by_the_lm(world_kwargs, core_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        core_class(2, **{**world_kwargs, **kwargs})
