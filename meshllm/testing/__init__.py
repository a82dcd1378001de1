"""Tools for testing meshes on one machine (latency and loss between nodes, engine processes left
behind) and fakes for unit tests (a clock and a process supervisor) — not used when serving."""
