"""Built-in model zoo: plain ``nn.Module`` factories for 32x32 inputs, reached by name.

Example:
    >>> from autoshrink import models
    >>> models.list_models("resnet*")
    ['resnet18_32', 'resnet20']
    >>> model = models.create("resnet20", num_classes=10, in_chans=1)
"""

from __future__ import annotations

# Imported for their @register_model side effect; no model is built at import.
from . import densenet, mobilenet, resnet, vit  # noqa: F401
from ._registry import create, list_models, register_model

__all__ = ["create", "list_models", "register_model"]
