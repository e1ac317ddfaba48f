"""har-edge: human activity recognition at the edge, from Garmin IMU exports.

Subpackages (the dependency rule: each may import only those above it):

- :mod:`har_edge.agent`: the edge inference agent (inbox -> decode -> TFLite -> SQLite outbox);
- :mod:`har_edge.sync`: the edge sync daemon (outbox -> MLflow; registry -> verified model);
- :mod:`har_edge.trainer`: the lab side (data -> Keras -> int8 TFLite -> release).
"""

__version__ = "0.1.0"
