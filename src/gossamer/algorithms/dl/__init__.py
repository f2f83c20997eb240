"""Fully decentralized algorithms."""
