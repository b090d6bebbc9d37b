"""`fanoutd save`: the published stream into rotated Parquet files, for analysts.

Each batch becomes rows of the current file through Batch.to_arrow() (version 2 batches
are not copied on the way), with the batch's sensor, iface, worker, epoch and seq added as
columns. A file is written as NAME.parquet.part and renamed to NAME.parquet once closed,
so a reader globbing *.parquet never opens a file being written. A new file starts when
the current one holds --rotate-rows rows or is --rotate-seconds old, and whenever the
batches' fields change (a reload that turned payload bytes on, a newer daemon); not
with tunnels: to_arrow() has the tunnel columns, all null, in a batch without any.
Needs pyarrow (pip install 'fanoutd[arrow]').
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fanoutd.batch import Batch

STREAM_COLUMNS = ("sensor", "iface", "worker", "epoch", "seq")


@dataclass
class SaveTotals:
    rows: int = 0
    batches: int = 0
    files: int = 0


class ParquetSink:
    """Batches in, rotated Parquet files out."""

    def __init__(self, directory: str | Path, rotate_rows: int = 10_000_000,
                 rotate_seconds: float = 3600.0, compression: str = "zstd",
                 prefix: str = "fanoutd") -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa, self._pq = pa, pq
        self.directory = Path(directory)
        self.rotate_rows = rotate_rows
        self.rotate_seconds = rotate_seconds
        self.compression = compression
        self.prefix = prefix
        self.totals = SaveTotals()
        self.written: list[Path] = []
        self._writer: Any = None
        self._schema: Any = None
        self._part: Path | None = None
        self._rows_in_file = 0
        self._opened_at = 0.0

    def add(self, batch: Batch) -> None:
        """Append one batch (its rows, and its stream's names as columns)."""
        table = self._with_stream_columns(batch)
        if self._writer is not None and (
                table.schema != self._schema
                or self._rows_in_file >= self.rotate_rows
                or time.monotonic() - self._opened_at >= self.rotate_seconds):
            self.close_file()
        if self._writer is None:
            self._open(table.schema)
        self._writer.write_batch(table)
        self._rows_in_file += table.num_rows
        self.totals.rows += table.num_rows
        self.totals.batches += 1

    def tick(self) -> None:
        """Rotate by age even while no batch arrives."""
        if (self._writer is not None
                and time.monotonic() - self._opened_at >= self.rotate_seconds):
            self.close_file()

    def _with_stream_columns(self, batch: Batch) -> Any:
        pa = self._pa
        data = batch.to_arrow()
        n = data.num_rows
        extra = [
            pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int8()), [batch.sensor]),
            pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int8()), [batch.iface]),
            pa.array([batch.worker] * n, pa.uint16()),
            pa.array([batch.epoch or 0] * n, pa.uint64()),
            pa.array([batch.seq] * n, pa.uint64()),
        ]
        return pa.RecordBatch.from_arrays([*extra, *data.columns],
                                          names=[*STREAM_COLUMNS, *data.schema.names])

    def _open(self, schema: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{self.prefix}-{stamp}-{os.getpid()}-{self.totals.files:06d}.parquet"
        self._part = self.directory / f"{name}.part"
        self._writer = self._pq.ParquetWriter(self._part, schema,
                                              compression=self.compression)
        self._schema = schema
        self._rows_in_file = 0
        self._opened_at = time.monotonic()

    def close_file(self) -> None:
        """Finish the current file (its footer) and give it its final name."""
        if self._writer is None or self._part is None:
            return
        self._writer.close()
        final = self._part.with_suffix("")  # NAME.parquet.part -> NAME.parquet
        os.replace(self._part, final)
        self.written.append(final)
        self.totals.files += 1
        self._writer = None
        self._part = None

    def close(self) -> None:
        self.close_file()


def safe_name(text: str) -> str:
    """A file-name stem from a sensor endpoint or label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "fanoutd"
