"""The method-agnostic training loop (accelerate): ``train(TrainConfig(...))``.

Imported on first use, so that :mod:`moecraft.train.config` (the CLI's options) does not import the loop.
"""

from moecraft.lazy import lazy_exports

_EXPORTS = {"moecraft.train.config": ["TrainConfig"], "moecraft.train.loop": ["train"]}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["TrainConfig", "train"]
