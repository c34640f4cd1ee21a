"""What a checkpoint's checksums cost: XXH3-64 (the one trainer.checkpoint.store records) per GB.

Three figures, each the best of --repeats on one core:
* hash only: xxh3_64 over an in-memory buffer in the 8 MiB chunks a verify reads (the CPU cost);
* write: a torch.save of --mb MiB of fp32 tensors through CheckpointStore.write_stream, which hashes
  on the way out, against the same torch.save into a plain file (the cost at save time);
* verify: CheckpointStore.checksum of that file (a full read; from the page cache here, so it shows
  the hashing, not the disk) - what resume, `dip sample`, `dip export` and the eval pool pay per file.
Others for comparison: crc32 (zlib), blake2b, sha256.

    python benchmarks/checksum.py [--mb 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _hash_rates(data: bytes, repeats: int) -> dict[str, float]:
    """Seconds per GB of each algorithm over `data`, fed in 8 MiB chunks."""
    import xxhash

    from trainer.checkpoint.store import READ_CHUNK

    view = memoryview(data)
    chunks = [view[i:i + READ_CHUNK] for i in range(0, len(view), READ_CHUNK)]

    def streaming(make):
        def run():
            hasher = make()
            for chunk in chunks:
                hasher.update(chunk)
            hasher.digest()
        return run

    def crc32():
        value = 0
        for chunk in chunks:
            value = zlib.crc32(chunk, value)

    algorithms = {"xxh3_64 (recorded)": streaming(xxhash.xxh3_64), "crc32": crc32,
                  "blake2b": streaming(hashlib.blake2b), "sha256": streaming(hashlib.sha256)}
    return {name: _best(fn, repeats) / (len(data) / 1e9) for name, fn in algorithms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="size of the checkpoint file (MiB)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from trainer.checkpoint.store import CheckpointStore

    torch.set_num_threads(1)
    numel = (args.mb << 20) // 4
    state = {f"w{i}": torch.randn(numel // 8) for i in range(8)}  # 8 tensors, like a small state dict
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
                     "load_average": os.getloadavg(), "file_mb": args.mb, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                               time.gmtime())}
    results["hash_s_per_gb"] = _hash_rates(os.urandom(256 << 20), args.repeats)
    with tempfile.TemporaryDirectory(prefix="dip-checksum-bench-") as root:
        store = CheckpointStore(root)
        plain = os.path.join(root, "plain.pt")

        def save_plain():
            with open(plain, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        record = {}

        def save_hashed():
            record.update(store.write_stream("step-1/state.pt", lambda f: torch.save(state, f)))

        size_gb = None
        timings = {}
        for name, fn in (("write_plain", save_plain), ("write_hashed", save_hashed)) * 2:  # interleaved
            timings.setdefault(name, []).append(_best(fn, args.repeats))
        size_gb = record["size"] / 1e9
        plain_s, hashed_s = min(timings["write_plain"]), min(timings["write_hashed"])
        verify_s = _best(lambda: store.checksum(1, "state.pt"), args.repeats)
        results.update(file_gb=size_gb, write_plain_s_per_gb=plain_s / size_gb,
                       write_hashed_s_per_gb=hashed_s / size_gb, write_overhead_s_per_gb=(hashed_s - plain_s) / size_gb,
                       verify_s_per_gb=verify_s / size_gb)
    print(json.dumps(results, indent=1))
    print(f"xxh3_64: {results['hash_s_per_gb']['xxh3_64 (recorded)']:.3f} s/GB hashing; save "
          f"{results['write_plain_s_per_gb']:.2f} -> {results['write_hashed_s_per_gb']:.2f} s/GB with the checksum; "
          f"verify (page cache) {results['verify_s_per_gb']:.3f} s/GB")


if __name__ == "__main__":
    main()
