"""llm_envs: a frozen LLM's token generation as Gymnasium environments.

`import llm_envs` registers the environments, then `gym.make("llm_envs/TokenAccept-v0")`;
or `gym.make("llm_envs:llm_envs/TokenAccept-v0")` imports and registers in one go.
"""

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

if "llm_envs/TokenAccept-v0" not in registry:
    register(
        id="llm_envs/TokenAccept-v0",
        entry_point="llm_envs.envs.token_accept:TokenAcceptEnv",
        vector_entry_point="llm_envs.vector:token_accept_vector_env",
    )

if "llm_envs/TokenChoice-v0" not in registry:
    register(
        id="llm_envs/TokenChoice-v0",
        entry_point="llm_envs.envs.token_choice:TokenChoiceEnv",
        vector_entry_point="llm_envs.vector:token_choice_vector_env",
    )


def make_sb3_vec_env(env_id: str, num_envs: int, **kwargs):
    """An SB3 `VecEnv` of `num_envs` envs on one batched engine (for MaskablePPO). Imports
    stable-baselines3 only now: `import llm_envs` and `gym.make_vec` never do."""
    from llm_envs.vector.sb3 import make_sb3_vec_env as make

    return make(env_id, num_envs, **kwargs)


__all__ = ["__version__", "make_sb3_vec_env"]
