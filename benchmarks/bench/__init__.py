"""The benchmark suite behind `llm-envs bench`: config, methods, records, leaderboard, sweeps, plots."""
