"""From a dataset to tokenised rows: sources, row rules, templating and tokenising, piece encoding, the
held-out split, the artifact's files."""
