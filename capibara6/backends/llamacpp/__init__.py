"""llama.cpp backends: one sequence per context (plain), or continuous batching (batched + scheduler)."""
