"""har-edge trainer: data -> windows -> Keras -> int8 TFLite + manifest -> MLflow -> DVC release.

Runs in the lab or CI, never on the edge. It may import the agent's pure
preprocessing and runtime (one implementation for training and serving); the
agent never imports the trainer.
"""

__version__ = "0.1.0"
