"""Callbacks that run a sparsetrain method inside other training frameworks.

- :mod:`sparsetrain.integrations.huggingface`: ``SparsetrainCallback`` for the Hugging Face ``Trainer``
  (``pip install 'sparsetrain[hf]'``);
- :mod:`sparsetrain.integrations.lightning`: ``SparsetrainCallback`` for the Lightning ``Trainer``
  (``pip install 'sparsetrain[lightning]'``).

Each module imports its framework when it is imported itself, so this package costs nothing without them.
"""
