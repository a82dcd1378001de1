"""Tools for testing meshes on one machine (latency and loss between nodes) — not used when serving."""
