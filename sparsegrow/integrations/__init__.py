"""Callbacks that run a Sparsifier inside other trainers.

    from sparsegrow.integrations.huggingface import SparsegrowCallback   # pip install sparsegrow[hf]
    from sparsegrow.integrations.lightning import SparsegrowCallback     # pip install sparsegrow[lightning]

Each submodule imports its framework; this package imports none, so `import sparsegrow` never
needs transformers or lightning. What the two callbacks share (the schedule derived from the
trainer's total steps, the stats turned into scalars to log) lives in `_common`.
"""
