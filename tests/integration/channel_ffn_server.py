"""`python -m ffn_nodes.server`, but with ffn_nodes.server imported as a module (tests only).

Run as `-m ffn_nodes.server`, the server is the module `__main__`, while ffn_nodes.channel_acceptors
registers the gloo/shm acceptors with the module `ffn_nodes.server` — a second copy whose registry
`__main__` never reads. Starting through this wrapper keeps one copy.
"""

from __future__ import annotations

from ffn_nodes.server import main

if __name__ == "__main__":
    raise SystemExit(main())
