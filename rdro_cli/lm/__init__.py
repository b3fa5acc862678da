"""The language model as rdro uses it: loading and fingerprints, the chunked completion log-prob head,
batching and packing, fast paths, throughput, generation."""
