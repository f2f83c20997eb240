"""Run directories, metrics recording and plots."""
