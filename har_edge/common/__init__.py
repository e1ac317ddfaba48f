"""Contracts shared by the agent, sync and the trainer, each defined once.

This package imports nothing else of har-edge; every other package may import it.
"""
