"""Cost of the content digests manifests record (issue 13.3): sha256 against xxh3-128, on one file.

Contenders, each over the same file of `--mib` MiB of random bytes, read in 8 MiB blocks:

- ``read``: reading the blocks and hashing nothing: the floor any digest pays (the file is in the page
  cache after it is written, so this is memory bandwidth, the case where the hash is most visible);
- ``sha256``: hashlib's sha256 (OpenSSL), what `artifacts.hash_file_cached` uses for model fingerprints;
- ``xxh3_128``: `digests.digest_file`, what manifests record;
- ``cached``: `digests.digest_cached` on a file it has seen: a stat and a dict look-up.

Each contender runs `--repeats` times, alternating; the table shows the median seconds, MiB/s and the
ratio against sha256 measured in the same run. The last stdout line is one JSON object with every figure.

    .venv/bin/python benchmarks/digest_bench.py            # 512 MiB, 5 repeats
    .venv/bin/python benchmarks/digest_bench.py --quick    # 8 MiB, 2 repeats: a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdro_cli.store import digests  # noqa: E402


def _read(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(8 << 20):
            pass


def _sha256(path: Path) -> str:
    return digests.digest_file(path, "sha256")


CONTENDERS = {"read": _read, "sha256": _sha256, "xxh3_128": digests.digest_file,
              "cached": digests.digest_cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="8 MiB, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.repeats = 8, 2
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("RDRO_CACHE_DIR", str(Path(tmp) / "cache"))
        path = Path(tmp) / "blob.bin"
        with open(path, "wb") as handle:
            for _ in range(args.mib):
                handle.write(os.urandom(1 << 20))
        assert digests.digest_file(path, "sha256") == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        digests.digest_cached(path)  # warm the cache for the `cached` contender
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for _ in range(args.repeats):
            for name, fn in CONTENDERS.items():
                began = time.perf_counter()
                fn(path)
                times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'contender':<10} {'seconds':>10} {'MiB/s':>10} {'sha256 / contender':>20}")
    for name, seconds in median.items():
        print(f"{name:<10} {seconds:>10.4f} {args.mib / seconds:>10.0f} {median['sha256'] / seconds:>20.2f}")
    summary = {"mib": args.mib, "repeats": args.repeats, "seconds": median,
               "mib_per_s": {name: args.mib / s for name, s in median.items()},
               "xxh3_speedup_over_sha256": median["sha256"] / median["xxh3_128"],
               "sha256_over_read": median["sha256"] / median["read"]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
