"""The PyTorch backends, one concern per module.

* ``blocks``: the pure per-block functions (attention over the KV cache, MLP, norm, head)
  and their weight/config tuples; ``torch-compile`` compiles these same functions.
* ``weights``: views of a ``transformers`` model's parameters as the blocks' weights, and
  its context limits, RoPE tables and end-of-sequence ids.
* ``kvcache``: the preallocated KV cache, the tokens it holds, rollback, and the hidden
  states captured for the block oracle.
* ``oracle``: ``TorchBlockOracle``, the planners' batched view of single blocks.
* ``tokens``: token selection, greedy verification and rejection sampling on the device
  (the ``draft`` / ``verify`` hot path; the torch twin of ``knapspec.sampling``).
* ``loading``: locating, de-quantizing and caching model files (``load_torch_model``).
* ``eager``: ``TorchEagerBackend`` (registry name ``torch``).
* ``compile``: ``TorchCompileBackend`` (registry name ``torch-compile``).

Nothing here is imported by ``knapspec.backends`` until a torch backend is asked for, so
the planner and the llama.cpp backend never pull in torch.
"""
