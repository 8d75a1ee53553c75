"""The run directory: crash-safe, exactly-once commits of part files (row contract: ``row_schema``).

Layout::

    RUN_DIR/job.json              validated spec + what was resolved (impl, device, dtype, versions)
    RUN_DIR/docs.parquet          doc, source, n_tokens, status, language
    RUN_DIR/lens/part-NNNNNN.parquet   one per shard (encodings: PART_ENCODING)
    RUN_DIR/_manifest.jsonl       one line per committed shard (with its partial aggregates)
    RUN_DIR/_status.json          progress, replaced atomically
    RUN_DIR/_driver.lock          who runs the job now (``run.lock``: one driver per directory)
    RUN_DIR/_staging/             parts written by Ray workers, not yet committed by the driver
    RUN_DIR/summary.json          corpus aggregates merged from the manifest

A shard is committed by writing its part under a temporary name, fsyncing it, renaming it over the
final name (atomic on POSIX) and then appending its manifest line (fsynced). A crash before the
manifest line leaves at most an orphan part that the rerun recomputes and overwrites; a shard is
never listed twice, so every (doc, pos, layer) row exists exactly once across committed parts.

Under Ray the workers write the parts themselves (``write_part``, to a ``staging_path`` the driver
chose) and the driver commits each with ``commit_part``: the rename and the manifest line, the same
two steps, so the rules above hold unchanged and the driver never touches a part's bytes (the
worker also encodes the manifest line, ``manifest_line``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from codelens.engine.errors import RunDirError

PART_PATTERN = "part-{:06d}.parquet"

# Chosen by measurement on real lens rows (328k rows, k = 10): see
# benchmarks/results/parquet-encoding.md (benchmarks/bench_parquet.py). Together: 2.9x less write
# time per row than dictionary-on-every-column + zstd, and 17 % smaller files.
PART_ENCODING: dict[str, Any] = {
    # Dictionary encoding only where a part holds a handful of distinct values. On the
    # near-unique floats it costs 3-4x the write time and 20-60 % more bytes, on the other int
    # columns it gains nothing; site and category need it: without it they read back with only
    # the values present, not the row contract's fixed dictionaries. (Parquet has no dictionary
    # encoding for booleans.)
    "dictionary": ("layer", "site", "category"),
    # Float columns (scalar and list leaves): split into byte streams, 9 % smaller under lz4.
    "floats": "BYTE_STREAM_SPLIT",
    # Int columns that increase within a document: stored as deltas, 11 % smaller again.
    "delta": ("pos", "line", "byte_start", "byte_end"),
    # lz4 (written as LZ4_RAW): ~20 % less write time per row than zstd for +17 % size.
    "compression": "lz4",
    "row_group_size": 1 << 17,
}
"""How ``write_part`` writes a part file: which columns get which Parquet encoding and
the codec. Only the encoding changes: a part reads back with the table's schema and values."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """``write_atomic`` of pretty JSON."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def manifest_line(shard: int, entry: dict[str, Any]) -> bytes:
    """Shard ``shard``'s manifest line (without its newline): the part's file and ``entry``.

    Encoding it is most of a commit's cost to the driver (the partials of a 28-layer shard are
    about 0.5 MB of JSON), so a Ray worker encodes it and the driver only appends it.
    """
    return json.dumps(
        {"shard": shard, "file": f"lens/{PART_PATTERN.format(shard)}", **entry}, default=str
    ).encode()


def write_part(table: pa.Table, path: Path) -> None:
    """Write ``table`` as one part file at ``path`` (encodings: ``PART_ENCODING``), fsynced.

    Written under a temporary name beside ``path`` and renamed, so ``path`` either does not exist
    or holds the whole part, even when the writer is killed midway.
    """
    dictionary: list[str] = []
    encoding: dict[str, str] = {}
    for field in table.schema:
        kind = field.type
        leaf = field.name
        if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind):
            # Per-column options name Parquet leaves; the list's own name would be ignored.
            kind, leaf = kind.value_type, f"{field.name}.list.element"
        if field.name in PART_ENCODING["dictionary"] or pa.types.is_dictionary(kind):
            dictionary.append(leaf)  # an Arrow dictionary column keeps its whole dictionary
        elif pa.types.is_float32(kind) or pa.types.is_float64(kind):
            encoding[leaf] = PART_ENCODING["floats"]
        elif field.name in PART_ENCODING["delta"] and pa.types.is_integer(kind):
            encoding[leaf] = "DELTA_BINARY_PACKED"
    path.parent.mkdir(parents=True, exist_ok=True)  # the staging folder is made on first use
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        pq.write_table(
            table,
            tmp,
            compression=PART_ENCODING["compression"],
            row_group_size=PART_ENCODING["row_group_size"],
            use_dictionary=dictionary,
            column_encoding=encoding or None,
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunDir:
    """A run directory and its commit protocol."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lens_dir = self.path / "lens"
        self.job_file = self.path / "job.json"
        self.docs_file = self.path / "docs.parquet"
        self.manifest_file = self.path / "_manifest.jsonl"
        self.status_file = self.path / "_status.json"
        self.summary_file = self.path / "summary.json"
        self.staging_dir = self.path / "_staging"

    # -- set-up ---------------------------------------------------------------------------------

    def prepare(self, fingerprint: str, job_name: str, *, overwrite: bool) -> bool:
        """Create the directory and check what it holds. Nothing existing is removed here.

        Returns:
            True when a different job's results are there and ``overwrite`` allows replacing
            them: the caller clears them (``clear``) only once the new job has planned and loaded,
            so a new job that fails early loses nothing already written.

        Raises:
            RunDirError: not writable, or a different job's results are there without ``overwrite``.
        """
        try:
            self.lens_dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-", delete=True)
            probe.close()
        except OSError as e:
            raise RunDirError(
                f"output dir {self.path} is not writable ({e.strerror or e}); choose another "
                "output.dir (e.g. --set output.dir=/tmp/run) or fix its permissions"
            ) from None
        existing = self.read_job()
        if existing is None or existing.get("fingerprint") == fingerprint:
            return False
        if not overwrite:
            raise RunDirError(
                f"{self.path} holds results of a different job ({existing.get('name')!r}, "
                f"fingerprint {existing.get('fingerprint')} != {fingerprint}); rerun with "
                "--overwrite to replace them, or choose another output.dir"
            )
        return True

    def clear(self) -> None:
        """Remove every result file of a previous job (keeps the directory)."""
        shutil.rmtree(self.lens_dir, ignore_errors=True)
        for f in (
            self.job_file,
            self.docs_file,
            self.manifest_file,
            self.status_file,
            self.summary_file,
        ):
            f.unlink(missing_ok=True)
        for extra in ("report", "_staging"):
            shutil.rmtree(self.path / extra, ignore_errors=True)
        self.lens_dir.mkdir(parents=True, exist_ok=True)

    def read_job(self) -> dict[str, Any] | None:
        """job.json as a dict, or None when absent."""
        if not self.job_file.exists():
            return None
        try:
            return json.loads(self.job_file.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.job_file} is corrupt ({e}); rerun with --overwrite") from None

    # -- commits --------------------------------------------------------------------------------

    def part_path(self, shard: int) -> Path:
        """Final path of shard ``shard``'s part file."""
        return self.lens_dir / PART_PATTERN.format(shard)

    def committed(self) -> dict[int, dict[str, Any]]:
        """Manifest entries by shard index (a torn last line from a crash is ignored)."""
        entries: dict[int, dict[str, Any]] = {}
        if not self.manifest_file.exists():
            return entries
        for line in self.manifest_file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # only the last line can be torn; its shard is simply redone
            if self.part_path(entry["shard"]).exists():
                entries[entry["shard"]] = entry
        return entries

    def commit_shard(self, shard: int, table: pa.Table, entry: dict[str, Any]) -> None:
        """Write shard ``shard``'s rows and record it in the manifest (exactly once).

        The part is encoded per column as ``PART_ENCODING`` says (host time per row is what a part
        write costs the run); the rows read back are the table's, schema and dictionaries included.
        """
        write_part(table, self.part_path(shard))  # atomic: a temporary name, then a rename
        self._record(manifest_line(shard, entry))

    def commit_part(self, shard: int, staged: Path, line: bytes) -> None:
        """Commit a part file already written (by ``write_part``) to ``staged``, a path in this run
        directory: rename it to its final name, then append the shard's manifest ``line``
        (``manifest_line``).

        This is the driver's whole share of a commit when a worker wrote the part and encoded its
        line (Ray): a rename and an append, whatever the part's size. ``staged`` must be on the
        run directory's file system (``staging_path`` names one), so that the rename is atomic.

        Raises:
            RunDirError: ``staged`` does not exist: the worker wrote it where this process cannot
                see it (a directory that is not shared between the nodes).
        """
        try:
            os.replace(staged, self.part_path(shard))
        except FileNotFoundError:
            raise RunDirError(
                f"the part file of shard {shard} is not at {staged}, where its worker wrote it: "
                f"{self.path} must be one directory shared by every node (NFS, Lustre, ...), "
                "mounted at the same path on the driver's node and the workers'"
            ) from None
        self._record(line)

    def _record(self, line: bytes) -> None:
        """The second step of a commit, once the part has its final name: make the
        rename durable, then append (and fsync) its manifest line."""
        _fsync_dir(self.lens_dir)
        with open(self.manifest_file, "ab+") as f:
            # A crash mid-append leaves a torn last line without its newline: start a new line,
            # or this entry would be glued onto the torn one and be lost with it.
            torn = (
                f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
            )
            f.write((b"\n" if torn else b"") + line + b"\n")
            f.flush()
            os.fsync(f.fileno())

    # -- parts written by workers -----------------------------------------------------------------

    def staging_path(self, shard: int, tag: str) -> Path:
        """Where a worker writes shard ``shard``'s part for the driver to commit.

        ``tag`` makes the name unique per attempt (the driver's run token and a submission number),
        so two workers that computed the same shard (a retry) never write the same file; the one the
        driver commits is renamed into ``lens/``, the others are removed. The staging directory is
        outside ``lens/``, so a reader of ``lens/*.parquet`` never sees an uncommitted part.
        """
        return self.staging_dir / f"part-{shard:06d}.{tag}.parquet"

    def clear_staging(self) -> None:
        """Remove uncommitted parts (of attempts the driver dropped, or of a killed driver)."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def write_docs(self, table: pa.Table) -> None:
        """Write docs.parquet atomically."""
        tmp = self.docs_file.with_name(f".docs.{os.getpid()}.tmp")
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, self.docs_file)
        finally:
            tmp.unlink(missing_ok=True)

    def write_status(self, status: dict[str, Any]) -> None:
        """Replace _status.json atomically."""
        write_json_atomic(self.status_file, status)

    def read_status(self) -> dict[str, Any] | None:
        """_status.json as a dict, or None when absent."""
        if not self.status_file.exists():
            return None
        return json.loads(self.status_file.read_text())
