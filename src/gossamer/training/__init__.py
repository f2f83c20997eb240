"""What one node computes, shared by every executor: batched local training and evaluation
over stacked rows (the simulator batches many nodes; a runtime process runs one)."""
