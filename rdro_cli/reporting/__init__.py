"""report's library: reading runs, numbers, plots, the markdown page."""
