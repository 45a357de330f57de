"""knapspec self-speculative decoding as a Hugging Face ``custom_generate`` folder.

``model.generate(**inputs, custom_generate="<this folder>", trust_remote_code=True,
max_new_tokens=64)`` runs this file's ``generate``; transformers passes it every argument of
``generate()`` (``inputs``/``input_ids``, ``generation_config``, ``streamer``, ``tokenizer``,
``stop_strings``, ``knapspec_config``, ...) with ``model=`` the calling model.  All the work is
``knapspec.integrations.transformers.generate`` (``pip install knapspec[torch]``).
"""

from knapspec.integrations.transformers import generate as knapspec_generate


def generate(model, **kwargs):
    """Generate with knapspec on ``model``; returns what ``model.generate`` would (ids
    ``[1, prompt + new]``, or an output object with ``return_dict_in_generate=True``)."""
    return knapspec_generate(model, **kwargs)
