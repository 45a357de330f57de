"""knapspec inside decoding loops other packages own.

- ``knapspec.integrations.transformers.generate``: a ``custom_generate`` callable for
  Hugging Face ``model.generate`` (needs ``knapspec[torch]``);
- ``knapspec.integrations.llama_cpp.KnapSpecDraftModel``: a draft model for
  llama-cpp-python's speculative loop (needs ``llama-cpp-python``).

Each integration lives in its own module and imports its third-party package only when that
module is imported; importing this package imports none of them.
"""
