"""eval's library: pure scoring, the task table (read + run per task), which model to evaluate."""
