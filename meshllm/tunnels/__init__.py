"""Tunnels: stream services that carry other protocols across the mesh, one QUIC stream per exchange.

Above ``transport`` (they open and serve its streams) and below ``api``/``reconcile`` (which hand them
what to forward to). ``tunnels.http`` carries OpenAI API requests to the node serving the model.
"""
