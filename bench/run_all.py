"""Run every benchmark, print a summary, and rewrite ``docs/benchmarks.md`` (``make bench``).

The document is rewritten only when every benchmark produced a result, so a failed run never
leaves half-measured numbers behind; the exit status is 1 then.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable

from bench import (
    api_latency,
    metadata_load,
    pipeline_rtf,
    range_serving,
    s3_upload,
    search,
    sse_fanout,
    tus_upload,
    upload_throughput,
    worker_throughput,
)
from bench.common import describe_machine, log, raise_on_sigterm
from bench.report import Table, render_text, write_document

BENCHMARKS: dict[str, Callable[[], Table]] = {
    "upload_throughput": lambda: upload_throughput.run().table(),
    "range_serving": lambda: range_serving.run().table(),
    "pipeline_rtf": lambda: pipeline_rtf.run().table(),
    "api_latency": lambda: api_latency.run().table(),
    "worker_throughput": lambda: worker_throughput.run().table(),
    # Local and S3 (moto); the S3 half reports itself skipped when moto cannot start.
    "tus_upload": lambda: tus_upload.run().table(),
    # Scale-out: each reports itself skipped when its PostgreSQL or Redis cannot be reached.
    "s3_upload": lambda: s3_upload.run().table(),
    "metadata_load": lambda: metadata_load.run().table(),
    "sse_fanout": lambda: sse_fanout.run().table(),
    # Full-text search over 1M segments on SQLite and PostgreSQL (skipped without PostgreSQL).
    "search": lambda: search.run().table(),
}


def main() -> int:
    raise_on_sigterm()
    started = time.monotonic()
    machine = describe_machine()
    tables: list[Table] = []
    failed: list[str] = []
    for name, benchmark in BENCHMARKS.items():
        log(f"--- {name}")
        try:
            tables.append(benchmark())
        except Exception:
            traceback.print_exc()
            failed.append(name)
    print()
    for table in tables:
        print(render_text(table), end="\n\n")
    elapsed = time.monotonic() - started
    if failed:
        log(f"failed: {', '.join(failed)}; docs/benchmarks.md left as it was ({elapsed:.0f} s)")
        return 1
    path = write_document(machine, tables)
    log(f"wrote {path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
