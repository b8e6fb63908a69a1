"""Anomaly-detection methods: one module each, registered by name (see base.py)."""

from automl_ad.methods.base import (
    Batch,
    Method,
    available_methods,
    create_method,
    get_method_class,
    register,
)

__all__ = ["Batch", "Method", "available_methods", "create_method", "get_method_class", "register"]
