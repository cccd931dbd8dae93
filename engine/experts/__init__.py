"""The expert offload runtime: host store, GPU cache and policy, prefetch, expert compute."""
