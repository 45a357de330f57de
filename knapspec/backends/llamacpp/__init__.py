"""The llama.cpp backend (``pip install 'knapspec[llamacpp]'``).

Drafts are GGUF files written from the target's own tensors without the skipped blocks
(llama.cpp's ``deci`` architecture); see ``backend`` for the design.
"""

from .backend import LlamaCppBackend

__all__ = ["LlamaCppBackend"]
