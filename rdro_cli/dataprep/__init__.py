"""From a dataset to tokenised rows: sources, row parsing, templating and tokenising, piece encoding, the held-out split, the artifact's files."""
