"""The PyTorch backends: ``eager`` (registry name ``torch``), ``compile`` (``torch-compile``)
and ``loading`` (model files).  Nothing imports torch until a torch backend is asked for."""
