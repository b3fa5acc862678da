"""train's library: the training inputs, the set-up (policy, optimizer, schedule), the step loop, the output
directory and its checkpoints, trackers, model cards."""
