"""The central side of a fleet: PostgreSQL, an S3 object store and an MLflow server with per-device accounts.

Started without containers by ``python -m har_edge.central up`` (``make central``)
for tests and for a single server; ``docker/compose.central.yaml`` runs the same
three services in containers. This package imports only :mod:`har_edge.common`
and itself: it is the operator's side, not the device's.
"""
