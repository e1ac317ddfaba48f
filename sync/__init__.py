"""har-edge sync: the second daemon on the edge device.

- :mod:`sync.push`: outbox -> MLflow, one run per processed file, exactly once in effect.
- :mod:`sync.models`: registry (git tags + DVC) -> verify -> validate -> activate, health gate, rollback.
- :mod:`sync.daemon`: both on an APScheduler schedule with back-off; ``sync.cli`` adds the commands.
"""
