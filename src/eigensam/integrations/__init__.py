"""Integrations of the eigensam optimizers with training frameworks.

Each module needs its framework, installed through its own extra, and imports
:mod:`eigensam.optim` and :mod:`eigensam.hessian` (never the reverse):

- :mod:`eigensam.integrations.transformers`: the Hugging Face ``Trainer``
  (``pip install "eigensam[hf]"``).
"""
