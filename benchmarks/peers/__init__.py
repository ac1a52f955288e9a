"""kdistill side by side with the tools users pick instead: `python -m benchmarks.peers.run` (see run.py)."""
