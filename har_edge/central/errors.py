"""The central stack's errors: each message names the service or file and says what to do."""

from __future__ import annotations


class CentralError(Exception):
    """A central service could not be set up, started or reached."""


class ServiceStartError(CentralError):
    """A service did not come up (its log's tail is in the message)."""


class AccountError(CentralError):
    """The MLflow server refused an account or permission change."""
