"""har-edge trainer: data -> windows -> Keras -> int8 TFLite + manifest -> MLflow -> DVC release.

Runs in the lab or CI, never on the edge. It may import the agent's pure
preprocessing and runtime (one implementation for training and serving); the
agent never imports the trainer.
"""

from har_edge import __version__

__all__ = ["__version__"]
