"""What the checkpoint fingerprint costs: a SHA-256 of every byte of a weights file, then the cached hash.

Predict stores ``model_fingerprint`` in every record and compares it on a rerun, so it runs once per
predict. The first run reads and hashes the whole file; files of 64 MiB or more then keep their hash in
the cache (keyed by path, size, mtime and inode), so later runs only stat the file.

    python bench/fingerprint.py                        # a 1 GB file of random bytes in a temporary folder
    python bench/fingerprint.py --file model.safetensors
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help="a weights file (default: 1 GB of random bytes, made here)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=None if args.file is None else args.file.parent) as tmp:
        os.environ["DLLM_CACHE_DIR"] = str(Path(tmp) / "cache")
        from dllm.data import predictions

        path = args.file
        if path is None:
            path = Path(tmp) / "model.safetensors"
            with path.open("wb") as f:
                for _ in range(1000):
                    f.write(os.urandom(10**6))
        size = path.stat().st_size / 1e9
        cache = Path(tmp) / "cache" / "file-hashes.json"
        for run in range(args.runs):
            cache.unlink(missing_ok=True)
            start = time.perf_counter()
            first = predictions.model_fingerprint(str(path), {})
            cold = time.perf_counter() - start
            start = time.perf_counter()
            again = predictions.model_fingerprint(str(path), {})
            warm = time.perf_counter() - start
            assert first == again
            print(f"run {run}: {size:.2f} GB: first {cold:.2f} s ({size / cold:.2f} GB/s), cached {warm * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
