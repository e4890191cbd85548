"""The method-agnostic training loop (accelerate): ``train(TrainConfig(...))``."""

from moecraft.train.config import TrainConfig
from moecraft.train.loop import train

__all__ = ["TrainConfig", "train"]
