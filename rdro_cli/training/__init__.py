"""train's library: the training inputs, the set-up (policy, optimizer, schedule), the loop, trackers."""
