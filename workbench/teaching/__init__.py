"""The computations behind the teaching notebooks (notebooks/), so the notebooks hold no logic."""
