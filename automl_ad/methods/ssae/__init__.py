"""SSAE: the model (``model.py``) and its search space (``space.yaml``, package data:
ranges, what the Config accepts, the default synthesis family). See ``model.py``."""

from automl_ad.methods.ssae.model import (
    ConvexCombination,
    SelfSupervisedAutoencoder,
    Ssae,
)

__all__ = ["ConvexCombination", "SelfSupervisedAutoencoder", "Ssae"]
