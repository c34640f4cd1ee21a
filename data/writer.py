"""Write an image source into MDS and/or webdataset shards, in parallel, with a manifest.

Layout of an output directory (the `path` the readers take):

    OUT/manifest.json      counts per class, class names, format(s), resolution, bytes, shards + sha256
    OUT/mds/index.json     the standard MDS index (part-KKK/ sub-folders when written by K > 1 processes)
    OUT/wds/shard-KKK-NNNNNN.tar

Records are written in a seeded random order (never class-sorted): a shard is then a random
sample of the dataset, which is what shard-level shuffling at read time relies on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from data.sources import SourceItem
from data.transforms import CorruptImageError, adm_center_crop, decode_image, encode_image, verify_image

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
WRITER_FORMATS = ("mds", "wds", "both")
ENCODINGS = ("png", "jpeg", "npy")
MDS_COLUMNS = {"key": "str", "label": "int", "image": "bytes"}

log = logging.getLogger(__name__)
WARN_SKIPS = 10  # undecodable files named in the log per writer process; the manifest lists them all


class DamagedShardsError(ValueError):
    """Shard files that are missing or differ in size from the manifest (truncated or replaced)."""


def damaged_shards(root: str, manifest: dict, formats: list[str] | None = None) -> list[str]:
    """Problems of a local shard directory's files against its manifest: one line per damaged shard."""
    problems = []
    for fmt in formats or manifest.get("formats", []):
        for shard in manifest.get("shards", {}).get(fmt, []):
            path = os.path.join(root, fmt, shard["name"])
            try:
                size = os.path.getsize(path)
            except OSError:
                problems.append(f"{path} is missing")
                continue
            if size != shard["bytes"]:
                problems.append(f"{path} is {size} bytes, the manifest says {shard['bytes']} (truncated or replaced)")
    return problems


def check_shards(root: str, manifest: dict, formats: list[str] | None = None) -> None:
    """Raise DamagedShardsError naming every damaged shard of a local shard directory."""
    problems = damaged_shards(root, manifest, formats)
    if problems:
        raise DamagedShardsError(f"{root}: {len(problems)} damaged shard(s): {'; '.join(problems[:3])}"
                                 f"{' ...' if len(problems) > 3 else ''}. Restore them, or shard the images again "
                                 "(dip data shard)")


@dataclass
class ShardOptions:
    out: str
    format: str = "both"            # mds | wds | both
    resolution: int | None = None   # None: store the original encoded bytes
    encoding: str = "png"           # with --resolution: png (lossless) | jpeg | npy (raw uint8, fastest read)
    jpeg_quality: int = 95
    shard_size: int = 256 << 20     # bytes per shard (upper bound)
    workers: int = 1
    overwrite: bool = False
    order_seed: int = 0             # seeds the write order
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in WRITER_FORMATS:
            raise ValueError(f"--format {self.format!r} is not valid: choose one of {list(WRITER_FORMATS)}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"--encoding {self.encoding!r} is not valid: choose one of {list(ENCODINGS)}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution {self.resolution} is not valid: an integer >= 8 (or leave it out)")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality {self.jpeg_quality} is not valid: 1..100")
        if self.shard_size < 1 << 10:
            raise ValueError(f"--shard-size {self.shard_size} bytes is not valid: at least 1KB")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers} is not valid: an integer >= 1")

    @property
    def formats(self) -> list[str]:
        return ["mds", "wds"] if self.format == "both" else [self.format]


@dataclass
class PartResult:
    """What one writer process produced."""
    shards: dict[str, list[dict]] = field(default_factory=dict)  # format -> [{name, samples, bytes, sha256}]
    counts: dict[int, int] = field(default_factory=dict)         # label -> records written
    skipped: list[dict] = field(default_factory=list)             # [{key, reason}]
    written: int = 0


def parse_size(text: str | int) -> int:
    """'256MB' -> bytes (KB/MB/GB are powers of 1024; a bare number is bytes)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}
    cleaned = text.strip().upper()
    number = cleaned.rstrip("KMGB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--shard-size {text!r} is not valid: a size like 256MB, 1GB or 65536") from None
    if unit not in units:
        raise ValueError(f"--shard-size {text!r}: unknown unit {unit!r}; valid: {sorted(u for u in units if u)}")
    return int(value * units[unit])


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_output_dir(options: ShardOptions) -> None:
    """Refuse a non-empty output directory unless --overwrite; with it, remove only what we write."""
    os.makedirs(options.out, exist_ok=True)
    entries = sorted(os.listdir(options.out))
    if not entries:
        return
    if not options.overwrite:
        raise FileExistsError(
            f"--out {options.out!r} is not empty ({len(entries)} entries, e.g. {entries[:3]}); "
            f"pass --overwrite to replace shards written there, or choose an empty directory")
    ours = {MANIFEST, "mds", "wds"}
    foreign = [name for name in entries if name not in ours and not name.startswith(".tmp-")]
    if foreign:
        raise FileExistsError(
            f"--out {options.out!r} holds files `dip data shard` did not write ({foreign[:3]}); "
            f"refusing to overwrite: choose an empty directory")
    for name in entries:
        path = os.path.join(options.out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _encode_record(source, item: SourceItem, options: ShardOptions) -> tuple[bytes, str]:
    """Return (stored bytes, extension); raise CorruptImageError for undecodable input."""
    try:
        data = source.load(item)
    except OSError as err:
        raise CorruptImageError(f"unreadable: {err}") from err
    if options.resolution is None:
        fmt, _ = verify_image(data)
        return data, {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "NPY": "npy"}.get(fmt, fmt.lower())
    image = adm_center_crop(decode_image(data), options.resolution)
    return encode_image(image, options.encoding, options.jpeg_quality)


class _PartWriters:
    """The open shard writers of one process (MDS and/or webdataset), with per-shard bookkeeping."""

    def __init__(self, options: ShardOptions, part: int, num_parts: int) -> None:
        self.options, self.result = options, PartResult()
        self.mds = self.wds = None
        if "mds" in options.formats:
            from streaming import MDSWriter

            self.mds_dir = os.path.join(options.out, "mds", f"part-{part:03d}") if num_parts > 1 \
                else os.path.join(options.out, "mds")
            self.mds = MDSWriter(columns=MDS_COLUMNS, out=self.mds_dir, size_limit=options.shard_size,
                                 hashes=["sha1"], exist_ok=True)
        if "wds" in options.formats:
            import webdataset as wds

            self.wds_counts: list[int] = []
            os.makedirs(os.path.join(options.out, "wds"), exist_ok=True)
            pattern = os.path.join(options.out, "wds", f"shard-{part:03d}-%06d.tar")
            self.wds = wds.ShardWriter(pattern, maxcount=10**9, maxsize=options.shard_size, verbose=0,
                                       encoder=False, post=self._wds_shard_done)

    def _wds_shard_done(self, fname: str) -> None:
        self.wds_counts.append((fname, self.wds.count))

    def write(self, item: SourceItem, data: bytes, ext: str) -> None:
        if self.mds is not None:
            self.mds.write({"key": item.key, "label": item.label, "image": data})
        if self.wds is not None:
            self.wds.write({"__key__": f"{self.result.written:09d}", ext: data,
                            "cls": str(item.label).encode(), "key.txt": item.key.encode("utf-8")})
        self.result.written += 1
        self.result.counts[item.label] = self.result.counts.get(item.label, 0) + 1

    def finish(self) -> PartResult:
        out = self.options.out
        if self.mds is not None:
            self.mds.finish()
            with open(os.path.join(self.mds_dir, "index.json")) as handle:
                index = json.load(handle)
            prefix = os.path.relpath(self.mds_dir, os.path.join(out, "mds"))
            self.result.shards["mds"] = [
                {"name": os.path.normpath(os.path.join(prefix, shard["raw_data"]["basename"])),
                 "samples": shard["samples"], "bytes": shard["raw_data"]["bytes"],
                 "sha256": sha256_file(os.path.join(self.mds_dir, shard["raw_data"]["basename"]))}
                for shard in index["shards"]]
        if self.wds is not None:
            self.wds.close()
            # ShardWriter opens its first tar eagerly: an empty part leaves an empty tar behind.
            shards = []
            for fname, count in self.wds_counts:
                if count == 0:
                    os.remove(fname)
                    continue
                shards.append({"name": os.path.basename(fname), "samples": count,
                               "bytes": os.path.getsize(fname), "sha256": sha256_file(fname)})
            self.result.shards["wds"] = shards
        return self.result


def write_part(source, items: list[SourceItem], options: ShardOptions, part: int, num_parts: int,
               progress_counter=None) -> PartResult:
    """Write `items` into this part's shards; undecodable items are skipped and listed."""
    writers = _PartWriters(options, part, num_parts)
    for item in items:
        try:
            data, ext = _encode_record(source, item, options)
        except CorruptImageError as err:
            writers.result.skipped.append({"key": item.key, "reason": str(err)})
            if len(writers.result.skipped) <= WARN_SKIPS:
                log.warning("skipping %s: not a decodable image (%s)%s", item.key, err,
                            " (further ones: see the manifest)" if len(writers.result.skipped) == WARN_SKIPS else "")
        else:
            writers.write(item, data, ext)
        if progress_counter is not None:
            with progress_counter.get_lock():
                progress_counter.value += 1
    return writers.finish()


def _part_main(source, items, options, part, num_parts, counter, results) -> None:
    try:
        results.put((part, write_part(source, items, options, part, num_parts, counter), None))
    except BaseException as err:  # report, so the parent names the failing part instead of hanging
        results.put((part, None, f"{type(err).__name__}: {err}"))


def write_shards(source, options: ShardOptions) -> dict:
    """Shard the whole source; returns the manifest (also written to OUT/manifest.json)."""
    from tqdm import tqdm

    prepare_output_dir(options)
    started = time.time()
    items = source.items()
    if not items:
        raise ValueError(f"--src {source.describe()!r}: no files found")
    order = np.random.default_rng(options.order_seed).permutation(len(items))
    items = [items[i] for i in order]
    num_parts = min(options.workers, len(items))
    bounds = np.linspace(0, len(items), num_parts + 1).astype(int)
    parts = [items[bounds[p]:bounds[p + 1]] for p in range(num_parts)]

    bar = tqdm(total=len(items), desc="dip data shard", unit="img", mininterval=1.0,
               disable=None if options.progress else True)  # None: only on a terminal
    if num_parts == 1:
        results = [write_part(source, parts[0], options, 0, 1)]
        bar.update(len(items))
    else:
        results = _run_parallel(source, parts, options, bar)
    bar.close()

    manifest = _build_manifest(source, options, results, time.time() - started)
    if manifest["num_samples"] == 0:  # nothing to train on: an error, not an empty shard set
        for name in ("mds", "wds"):
            shutil.rmtree(os.path.join(options.out, name), ignore_errors=True)
        first = manifest["skipped"][0]
        raise ValueError(f"--src {source.describe()!r}: none of its {len(items)} file(s) is a decodable image "
                         f"(e.g. {first['key']}: {first['reason']}); nothing was written")
    if "mds" in options.formats and num_parts > 1:
        _merge_mds_index(options.out, num_parts)
    with open(os.path.join(options.out, MANIFEST + ".tmp"), "w") as handle:
        json.dump(manifest, handle, indent=1)
    os.replace(os.path.join(options.out, MANIFEST + ".tmp"), os.path.join(options.out, MANIFEST))
    return manifest


def _run_parallel(source, parts, options, bar) -> list[PartResult]:
    # fork: a spawned writer re-imports torch + streaming (tens of seconds on a small machine).
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counter, queue = context.Value("q", 0), context.Queue()
    procs = [context.Process(target=_part_main, args=(source, part_items, options, p, len(parts), counter, queue),
                             daemon=True) for p, part_items in enumerate(parts)]
    for proc in procs:
        proc.start()
    results: dict[int, PartResult] = {}
    errors = []
    try:
        while len(results) + len(errors) < len(procs):
            bar.update(counter.value - bar.n)
            try:
                part, result, error = queue.get(timeout=0.2)
            except Exception:  # queue.Empty: check that nobody died silently
                dead = [p for p, proc in enumerate(procs) if proc.exitcode not in (None, 0)
                        and p not in results]
                if dead:
                    raise RuntimeError(f"shard writer process(es) {dead} died (exit codes "
                                       f"{[procs[p].exitcode for p in dead]})") from None
                continue
            if error:
                errors.append(f"part {part}: {error}")
            else:
                results[part] = result
        bar.update(counter.value - bar.n)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("shard writing failed: " + "; ".join(errors))
    return [results[p] for p in range(len(procs))]


def _merge_mds_index(out: str, num_parts: int) -> None:
    """One MDS index.json over the part-KKK/ sub-folders (basenames become part-KKK/shard...)."""
    merged = {"version": 2, "shards": []}
    for part in range(num_parts):
        part_dir = os.path.join(out, "mds", f"part-{part:03d}")
        with open(os.path.join(part_dir, "index.json")) as handle:
            for shard in json.load(handle)["shards"]:
                for key in ("raw_data", "zip_data"):
                    if shard.get(key):
                        shard[key]["basename"] = f"part-{part:03d}/{shard[key]['basename']}"
                merged["shards"].append(shard)
    with open(os.path.join(out, "mds", "index.json"), "w") as handle:
        json.dump(merged, handle, sort_keys=True)


def _build_manifest(source, options: ShardOptions, results: list[PartResult], seconds: float) -> dict:
    counts: dict[int, int] = {}
    for result in results:
        for label, count in result.counts.items():
            counts[label] = counts.get(label, 0) + count
    shards = {fmt: [s for r in results for s in r.shards.get(fmt, [])] for fmt in options.formats}
    skipped = [s for r in results for s in r.skipped]
    return {
        "version": MANIFEST_VERSION,
        "source": source.describe(),
        "formats": options.formats,
        "resolution": options.resolution,
        "encoding": "original" if options.resolution is None else options.encoding,
        "num_samples": sum(r.written for r in results),
        "num_classes": len(source.class_names),
        "class_names": list(source.class_names),
        "counts_per_class": {name: counts.get(label, 0) for label, name in enumerate(source.class_names)},
        "skipped": skipped,
        "total_bytes": {fmt: sum(s["bytes"] for s in shard_list) for fmt, shard_list in shards.items()},
        "shards": shards,
        "order_seed": options.order_seed,
        "seconds": round(seconds, 2),
    }
