"""What rdro keeps on disk: durable writes and atomic directories, manifests and their integrity, file
digests (one cache), output locks, where a stage may write, disk space. Imports no other library."""
