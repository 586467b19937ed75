"""raven: Robust Augmented Variational auto-ENcoders, their baselines and robustness evaluation."""

from raven.config import ConfigError, TrainConfig
from raven.models import RavenModel
from raven.train import load_checkpoint

__all__ = ["ConfigError", "RavenModel", "TrainConfig", "load_checkpoint"]
__version__ = "0.1.0"
