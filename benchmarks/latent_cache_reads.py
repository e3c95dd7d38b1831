"""Random reads of latent-cache records (SD 1.5 sizes: 64x64x4 posterior mean and std in float32, two captions'
text states 77x768 in bfloat16: 0.37 MB a record) from local disk and from a `gs://` bucket, as training reads
them: grain's ArrayRecordDataSource, shuffled keys, `--threads` threads. The bucket is the test GCS server
(fake-gcs-server on 127.0.0.1, in memory: tests/gcs_server.py), so the figures are the readers' overhead, not a
real bucket's latency; `--bucket gs://NAME` reads a real one instead (credentials from the environment).

    python benchmarks/latent_cache_reads.py --records 400 --threads 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_shard(path: str, records: int) -> int:
    import ml_dtypes
    from array_record.python.array_record_module import ArrayRecordWriter

    from sdjax.data.latent_cache import serialize_record
    rng = np.random.default_rng(0)
    writer = ArrayRecordWriter(path, "group_size:1")
    size = 0
    for _ in range(records):
        record = serialize_record({
            "latent_mean": rng.standard_normal((64, 64, 4), np.float32),
            "latent_std": rng.random((64, 64, 4), np.float32), "time_ids": np.zeros(6, np.float32),
            "input_ids": np.zeros((2, 77), np.int32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768), np.float32).astype(ml_dtypes.bfloat16)})
        size += len(record)
        writer.write(record)
    writer.close()
    return size // records


def records_per_s(path: str, records: int, threads: int) -> float:
    import grain

    from sdjax.data.latent_cache import deserialize_record
    source = grain.sources.ArrayRecordDataSource([f"{path}[0:{records}]"])
    keys = np.random.default_rng(1).permutation(records)
    source[0]  # opens the reader (one footer read)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: deserialize_record(source[int(k)]), keys))
    return records / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--bucket", default="", help="a real gs:// bucket (default: the test GCS server)")
    args = parser.parse_args()
    import fsspec
    server = None
    bucket = args.bucket
    if not bucket:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from gcs_server import GcsServer
        server = GcsServer()
        bucket = server.make_bucket("sdjax-read-benchmark")
        os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = server.url  # array_record's C++ GCS client
    local = os.path.join(tempfile.mkdtemp(), "latents-00000-of-00001.array_record")
    record_bytes = write_shard(local, args.records)
    remote = f"{bucket}/latents-00000-of-00001.array_record"
    fs, bare = fsspec.core.url_to_fs(remote)
    fs.put_file(local, bare)
    print(f"{args.records} records of {record_bytes / 1e6:.2f} MB, {args.threads} threads")
    for name, path in (("local disk", local), ("gs:// (array_record's GCS reader)", remote)):
        rate = records_per_s(path, args.records, args.threads)
        print(f"| {name} | {rate:.0f} records/s | {rate * record_bytes / 1e6:.0f} MB/s |")
    start = time.perf_counter()
    fs.get_file(bare, local + ".downloaded")
    seconds = time.perf_counter() - start
    print(f"| whole shard downloaded with gcsfs | | {args.records * record_bytes / 1e6 / seconds:.0f} MB/s |")
    if server:
        server.stop()


if __name__ == "__main__":
    main()
