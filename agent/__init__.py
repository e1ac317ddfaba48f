"""har-edge agent: turns Garmin IMU exports into activity predictions on the CPU."""

__version__ = "0.1.0"
