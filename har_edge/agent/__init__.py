"""har-edge agent: turns Garmin IMU exports into activity predictions on the CPU."""

from har_edge import __version__

__all__ = ["__version__"]
