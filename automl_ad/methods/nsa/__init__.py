"""NSA: the model (``model.py``) and its search space (``space.yaml``, package data:
ranges, what the Config accepts, the default synthesis family). See ``model.py``."""

from automl_ad.methods.nsa.model import (
    ENCODER_STRIDE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BasicBlock,
    Nsa,
    NsaNetwork,
    TransposeBasicBlock,
)

__all__ = ["ENCODER_STRIDE", "IMAGENET_MEAN", "IMAGENET_STD", "BasicBlock", "Nsa", "NsaNetwork", "TransposeBasicBlock"]
