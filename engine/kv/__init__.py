"""The latent KV cache and its snapshots."""
