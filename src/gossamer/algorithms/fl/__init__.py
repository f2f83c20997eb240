"""Federated (server-based) algorithms."""
