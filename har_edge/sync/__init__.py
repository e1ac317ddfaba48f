"""har-edge sync: the second daemon on the edge device.

- :mod:`har_edge.sync.push`: outbox -> MLflow, one run per processed file, exactly once in effect.
- :mod:`har_edge.sync.models`: registry (git tags + DVC) -> verify -> validate -> activate, health gate, rollback.
- :mod:`har_edge.sync.daemon`: both on an APScheduler schedule with back-off; ``har_edge.sync.cli`` adds the commands.
"""
