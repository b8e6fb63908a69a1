"""DRAEM: the model (``model.py``) and its search space (``space.yaml``, package data:
ranges, what the Config accepts, the default synthesis family). See ``model.py``."""

from automl_ad.methods.draem.model import (
    DISCRIMINATIVE_STRIDE,
    DiscriminativeUNet,
    Draem,
    ReconstructiveNetwork,
)

__all__ = ["DISCRIMINATIVE_STRIDE", "DiscriminativeUNet", "Draem", "ReconstructiveNetwork"]
