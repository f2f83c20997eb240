"""The vectorized simulator: population state, batched training, simulated clock, drivers."""
