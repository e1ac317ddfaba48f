"""har-edge central: the server side a fleet shares (object store, database, tracking server), run on one host.

PostgreSQL, a SeaweedFS S3 store and an MLflow server with per-device accounts,
started without containers by ``python -m har_edge.central up`` (``make central``)
for tests and for a single server; ``docker/compose.central.yaml`` runs the same
three services in containers. This package imports only :mod:`har_edge.common`
and itself: it is the operator's side, not the device's.
"""
