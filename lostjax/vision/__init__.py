"""Vision models for the medical-imaging and image-classification application papers (Flax NNX).

Each module implements one paper's architecture as NNX modules that are used functionally (`nnx.split` /
`nnx.merge` inside jitted pure functions); the paper's losses live in `losses/` and its evaluation metrics in
`lostjax.metrics`. See each module's docstring for the paper, equations and deviations from the reference code.
"""
