"""The agent's on-disk spool: every batch is on disk before it is sent, removed once acked.

Layout of the spool directory (one per agent):

    00000000000000000042.batch   one batch, the opaque payload bytes exactly, named by its seq
    seq.state                    the highest seq ever allocated, as decimal text
    *.tmp                        a write in progress; whatever a crash leaves is removed on start
    agent.lock                   flock'ed by the agent that owns the directory, holding its pid
    quarantine/                  batches that could not be sent (damaged), kept for a post-mortem

Every file is written to a temporary name, fsynced (unless disabled) and renamed into place, so a
reader only ever sees complete files. The spool is bounded in payload bytes: when a new batch
pushes it over ``max_bytes`` the oldest batches are dropped, counted and logged, because during a
long collector outage the newest data is the most useful and the disk must not fill up. The
quarantine is bounded too (newest files kept), so a disk that keeps corrupting cannot fill it.

One Spool object per directory, in one process at a time (``SpoolLock``); its methods are safe to
call from several threads.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import logging
import os
import re
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_BATCH_SUFFIX = ".batch"
_TMP_SUFFIX = ".tmp"
_STATE_NAME = "seq.state"
LOCK_NAME = "agent.lock"
QUARANTINE_NAME = "quarantine"
# Zero-padded to the width of the largest uint64 so that name order is seq order.
_BATCH_NAME_RE = re.compile(r"^([0-9]{20})\.batch$")
_SEQ_MAX = 2**64 - 1  # seq travels as uint64 on the wire
# ensure_seq_above() never leaves fewer seqs than this: a collector (or a stream posing as this
# node) claiming a seq near the uint64 limit would otherwise exhaust the counter and stop sampling
# for good. 2**32 seqs are over a century of batches at one a second.
_SEQ_HEADROOM = 2**32
QUARANTINE_MAX_FILES = 64
QUARANTINE_MAX_BYTES = 16 * 1024 * 1024


def _batch_name(seq: int) -> str:
    return f"{seq:020d}{_BATCH_SUFFIX}"


def _make_private_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask; batches may name jobs and hosts, so be exact.
    os.chmod(directory, 0o700)


class SpoolBusyError(Exception):
    """Another process holds the spool directory's lock."""

    def __init__(self, directory: Path, holder_pid: int | None) -> None:
        holder = f"pid {holder_pid}" if holder_pid is not None else "pid unknown"
        super().__init__(
            f"spool directory {directory} is in use by another fleetwatch agent ({holder}); "
            "two agents on one spool would resend, ack and delete each other's batches"
        )
        self.directory = directory
        self.holder_pid = holder_pid


class SpoolLock:
    """An exclusive, non-blocking flock on ``<spool_dir>/agent.lock`` for as long as this object lives.

    flock (not a pid file alone) because the kernel drops it when the holder dies, however it
    dies, so a crashed agent never leaves a stale lock behind. The pid written into the file is
    only there to name the holder in the error; the lock file is never removed, because unlinking
    it would let a third process lock a fresh file while the second still holds the old inode.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._fd: int | None = None
        _make_private_directory(self.directory)
        path = self.directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder_pid = self._read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolBusyError(self.directory, holder_pid) from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    @staticmethod
    def _read_pid(fd: int) -> int | None:
        try:
            text = os.pread(fd, 32, 0).decode("ascii").strip()
            return int(text) if text else None
        except (OSError, UnicodeDecodeError, ValueError):
            return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        # An early return in main() drops the last reference: close the descriptor with it.
        self.release()

    def __enter__(self) -> SpoolLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Spool:
    """A directory of batches keyed by seq, bounded in bytes, that survives agent restarts.

    ``next_seq()`` allocates sequence numbers (monotone, from 1, never repeated across restarts);
    ``append()`` stores a batch; ``pending()`` returns what is not yet acked, oldest first;
    ``ack()`` removes the one batch a seq names; ``quarantine()`` moves a batch that cannot be
    sent out of the way. Sizes count payload bytes, not filesystem blocks.
    """

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        *,
        fsync: bool = True,
        quarantine_max_files: int = QUARANTINE_MAX_FILES,
        quarantine_max_bytes: int = QUARANTINE_MAX_BYTES,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # fsync=False trades durability on power loss (a renamed file may come back empty or
        # missing) for fewer disk flushes; an agent crash alone loses nothing either way.
        self.fsync = fsync
        self.quarantine_directory = self.directory / QUARANTINE_NAME
        self.quarantine_max_files = quarantine_max_files
        self.quarantine_max_bytes = quarantine_max_bytes
        self.dropped_batches = 0
        self.dropped_bytes = 0
        self.quarantined_batches = 0  # since this object was made, like dropped_batches

        self._lock = threading.Lock()
        self._seqs: list[int] = []  # sorted ascending; the in-memory index, with _sizes
        self._sizes: dict[int, int] = {}  # seq -> payload bytes
        self._total_bytes = 0
        self._last_seq = 0  # highest seq ever allocated (persisted in seq.state)

        self._create_directory()
        self._recover()

    # -- sequence numbers ------------------------------------------------------------------

    def next_seq(self) -> int:
        """Allocate the next sequence number; it is persisted before it is returned."""
        with self._lock:
            seq = self._last_seq + 1
            if seq > _SEQ_MAX:
                raise OverflowError("spool sequence numbers exhausted (uint64)")
            # Persist first: a seq handed out and then forgotten by a crash could be reused for
            # different data, which the collector's idempotent ingest would discard as a duplicate.
            self._write_state(seq)
            self._last_seq = seq
            return seq

    def ensure_seq_above(self, seq: int) -> bool:
        """Make the next allocated seq greater than ``seq``; True when the allocator moved.

        Only the allocator moves: no batch is removed, whatever ``seq`` is. A ``seq`` so high that
        fewer than 2**32 seqs would be left is refused (logged, False): no honest collector holds
        it, and following it would soon exhaust the uint64 counter.
        """
        if seq < 0 or seq > _SEQ_MAX:
            raise ValueError(f"seq out of range: {seq}")
        with self._lock:
            if seq <= self._last_seq:
                return False
            if seq > _SEQ_MAX - _SEQ_HEADROOM:
                log.error(
                    "refusing to number batches above seq %d: too close to the uint64 limit to be real; "
                    "new batches go on from %d",
                    seq,
                    self._last_seq + 1,
                )
                return False
            self._write_state(seq)
            self._last_seq = seq
            return True

    # -- batches ---------------------------------------------------------------------------

    def append(self, seq: int, payload: bytes) -> None:
        """Store one batch durably, then drop the oldest batches while over ``max_bytes``.

        ``seq`` must come from ``next_seq()``. A single payload larger than ``max_bytes`` can
        never be held; it is counted and logged as dropped instead of being written.
        Raises OSError (e.g. disk full) with nothing left behind when the write fails.
        """
        payload = bytes(payload)
        size_bytes = len(payload)
        with self._lock:
            if seq <= 0 or seq > self._last_seq:
                raise ValueError(f"seq {seq} was not allocated by next_seq() (last allocated {self._last_seq})")
            if seq in self._sizes:
                raise ValueError(f"seq {seq} is already in the spool")
            if size_bytes > self.max_bytes:
                self.dropped_batches += 1
                self.dropped_bytes += size_bytes
                log.warning(
                    "spool dropped 1 batch (%d bytes, seq %d): larger than the whole spool bound of %d bytes",
                    size_bytes,
                    seq,
                    self.max_bytes,
                )
                return
            final_path = self.directory / _batch_name(seq)
            self._write_atomically(final_path, payload)
            bisect.insort(self._seqs, seq)
            self._sizes[seq] = size_bytes
            self._total_bytes += size_bytes
            self._enforce_bound()

    def pending(self, after_seq: int = 0, *, max_batches: int | None = None) -> list[tuple[int, bytes]]:
        """Un-acked batches with seq > ``after_seq``, oldest first, read from disk.

        ``max_batches`` caps how many are read, so a sender catching up after a long outage
        need not hold the whole spool in memory at once.
        """
        with self._lock:
            start = bisect.bisect_right(self._seqs, after_seq)
            end = len(self._seqs) if max_batches is None else start + max_batches
            wanted = self._seqs[start:end]
            batches: list[tuple[int, bytes]] = []
            lost: list[int] = []
            for seq in wanted:
                try:
                    batches.append((seq, (self.directory / _batch_name(seq)).read_bytes()))
                except OSError as exc:
                    # Removed or damaged behind our back: nothing to resend, so forget it loudly.
                    log.error("spool batch seq %d is unreadable, forgetting it: %s", seq, exc)
                    lost.append(seq)
            for seq in lost:
                self._forget(seq)
            return batches

    def ack(self, seq: int) -> bool:
        """Remove the batch with exactly this ``seq``; True if it was held.

        Never a range: an ack says one batch was committed, and nothing about its neighbours (a
        lower seq may have been dropped, quarantined or not yet sent on this stream).
        """
        with self._lock:
            if seq not in self._sizes:
                return False
            # No directory fsync: if a removal is lost to power failure the batch is simply
            # sent again, and the collector's ingest is idempotent on (node, boot_id, seq).
            self._unlink_quietly(self.directory / _batch_name(seq))
            self._forget(seq)
            return True

    def quarantine(self, seq: int, reason: str) -> bool:
        """Move a batch that can never be sent (e.g. it does not decode) to ``quarantine/``.

        The batch leaves the index, so sending goes on with the next one; the file is kept, not
        deleted, so it can be examined. Logged once (each file is quarantined once) and counted.
        Returns False when the seq is not held (already acked, dropped or quarantined).
        """
        with self._lock:
            if seq not in self._sizes:
                return False
            source = self.directory / _batch_name(seq)
            kept_as: Path | None = None
            try:
                _make_private_directory(self.quarantine_directory)
                kept_as = self._free_quarantine_name(_batch_name(seq))
                os.replace(source, kept_as)
                # Stamped with the quarantine time, which the bound keeps the newest by; should
                # that fail, the write time orders it nearly as well.
                with contextlib.suppress(OSError):
                    os.utime(kept_as)
            except OSError as exc:
                # Cannot keep it: it must still leave the spool, or it blocks sending for good.
                log.error("spool could not move batch seq %d to %s: %s", seq, self.quarantine_directory, exc)
                self._unlink_quietly(source)
                kept_as = None
            size_bytes = self._sizes[seq]
            self._forget(seq)
            self.quarantined_batches += 1
            log.warning(
                "spool batch seq %d (%d bytes) quarantined%s: %s",
                seq,
                size_bytes,
                f" as {kept_as}" if kept_as is not None else " (removed)",
                reason,
            )
            self._enforce_quarantine_bound()
            return True

    # -- internals -------------------------------------------------------------------------

    def _create_directory(self) -> None:
        _make_private_directory(self.directory)

    def _free_quarantine_name(self, name: str) -> Path:
        """``quarantine/<name>``, or ``<name>.1``, ``.2``... when an earlier file already has it.

        Names can repeat when seq.state was lost and seqs were handed out again; the older file
        is evidence too and is not overwritten."""
        candidate = self.quarantine_directory / name
        suffix = 0
        while candidate.exists():
            suffix += 1
            candidate = self.quarantine_directory / f"{name}.{suffix}"
        return candidate

    def _enforce_quarantine_bound(self) -> None:
        """Keep the newest quarantined files within the file-count and byte bounds (lock held)."""
        entries: list[tuple[int, str, int]] = []  # (mtime ns, name, size bytes)
        try:
            for entry in os.scandir(self.quarantine_directory):
                if entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    entries.append((info.st_mtime_ns, entry.name, info.st_size))
        except OSError as exc:
            log.error("spool cannot list %s: %s", self.quarantine_directory, exc)
            return
        entries.sort(reverse=True)  # newest first
        kept_bytes = 0
        for index, (_, name, size_bytes) in enumerate(entries):
            kept_bytes += size_bytes
            if index >= self.quarantine_max_files or kept_bytes > self.quarantine_max_bytes:
                self._unlink_quietly(self.quarantine_directory / name)

    def _recover(self) -> None:
        """Rebuild the index and the seq allocator from the files present."""
        removed_tmp = 0
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(_TMP_SUFFIX):
                # A write that a crash interrupted before its rename: never complete, never acked.
                self._unlink_quietly(Path(entry.path))
                removed_tmp += 1
                continue
            if name in (_STATE_NAME, LOCK_NAME, QUARANTINE_NAME):
                continue
            match = _BATCH_NAME_RE.match(name)
            if match is None or not entry.is_file(follow_symlinks=False):
                log.warning("spool %s: skipping unexpected entry %r", self.directory, name)
                continue
            seq = int(match.group(1))
            if seq == 0 or seq > _SEQ_MAX:
                log.warning("spool %s: skipping batch with invalid seq %r", self.directory, name)
                continue
            size_bytes = entry.stat(follow_symlinks=False).st_size
            self._sizes[seq] = size_bytes
            self._total_bytes += size_bytes
        self._seqs = sorted(self._sizes)
        if removed_tmp:
            log.info("spool %s: removed %d half-written temp files", self.directory, removed_tmp)

        state_seq = self._read_state()
        max_file_seq = self._seqs[-1] if self._seqs else 0
        # Files can only be ahead of the state if seq.state was deleted or damaged by hand.
        self._last_seq = max(state_seq, max_file_seq)
        if self._seqs:
            log.info(
                "spool %s: recovered %d pending batches (%d bytes), seq %d..%d",
                self.directory,
                len(self._seqs),
                self._total_bytes,
                self._seqs[0],
                self._seqs[-1],
            )
        with self._lock:
            # The bound may have been lowered in the configuration since the last run.
            self._enforce_bound()

    def _read_state(self) -> int:
        path = self.directory / _STATE_NAME
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            log.error("spool state %s unreadable (%s); seq resumes after the batches on disk", path, exc)
            return 0
        try:
            seq = int(text.strip())
        except ValueError:
            seq = -1
        if not 0 <= seq <= _SEQ_MAX:
            # The collector's Welcome (ensure_seq_above) moves new seqs past what it holds.
            log.error(
                "spool state %s is corrupt (%r); seq resumes after the batches on disk",
                path,
                text[:40],
            )
            return 0
        return seq

    def _write_state(self, last_seq: int) -> None:
        self._write_atomically(self.directory / _STATE_NAME, f"{last_seq}\n".encode("ascii"))

    def _write_atomically(self, final_path: Path, data: bytes) -> None:
        tmp_path = final_path.with_name(final_path.name + _TMP_SUFFIX)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp_path, final_path)
        except BaseException:
            self._unlink_quietly(tmp_path)
            raise
        if self.fsync:
            # The rename itself is only durable once the directory entry is flushed.
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _enforce_bound(self) -> None:
        """Drop the oldest batches until the payload total fits in max_bytes (lock held)."""
        if self._total_bytes <= self.max_bytes:
            return
        dropped_count = 0
        dropped_bytes = 0
        while self._total_bytes > self.max_bytes and self._seqs:
            seq = self._seqs[0]
            dropped_bytes += self._sizes[seq]
            self._unlink_quietly(self.directory / _batch_name(seq))
            self._forget(seq)
            dropped_count += 1
        self.dropped_batches += dropped_count
        self.dropped_bytes += dropped_bytes
        log.warning(
            "spool over its bound of %d bytes: dropped %d oldest batches (%d bytes); %d batches (%d bytes) remain",
            self.max_bytes,
            dropped_count,
            dropped_bytes,
            len(self._seqs),
            self._total_bytes,
        )

    def _forget(self, seq: int) -> None:
        """Remove one seq from the in-memory index (lock held)."""
        index = bisect.bisect_left(self._seqs, seq)
        if index < len(self._seqs) and self._seqs[index] == seq:
            del self._seqs[index]
            self._total_bytes -= self._sizes.pop(seq)

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("spool could not remove %s: %s", path, exc)

    # -- state (properties last: `bytes` would shadow the builtin in annotations above) ----

    @property
    def bytes(self) -> int:
        """Payload bytes currently held."""
        return self._total_bytes

    @property
    def count(self) -> int:
        """Batches currently held."""
        return len(self._seqs)

    @property
    def oldest_seq(self) -> int | None:
        """Seq of the oldest batch held, or None when the spool is empty."""
        return self._seqs[0] if self._seqs else None

    @property
    def last_seq(self) -> int:
        """Highest seq allocated so far (0 before the first allocation)."""
        return self._last_seq
