"""Gossamer: federated and fully decentralized learning, simulated and deployed."""

__version__ = "0.1.0"
