"""llm_envs: a frozen LLM's token generation as Gymnasium environments.

`import llm_envs` registers the environments (`gym.make("llm_envs/TokenAccept-v0")`);
`gym.make("llm_envs:llm_envs/TokenAccept-v0")` imports and registers in one go.
"""

__version__ = "0.1.0"
