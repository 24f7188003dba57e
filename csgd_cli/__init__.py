"""csgd: prune deep CNNs with Centripetal SGD (Ding et al., CVPR 2019)."""

from .checkpoint import load_model
from .models import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "load_model", "register_model"]
__version__ = "0.1.0"
