"""Fleet-wide detection when collectors share a database: run by the fleet_detection lease holder.

A job's ranks may stream to different collectors, and the detectors that compare a job's ranks
(the straggler detectors) need every one of them, as do the clock detectors (thermal, power,
clocks) whose findings stragglers fold into (detectors/fold.py: one page per fault). So with a
shared database those detectors run once for the fleet, on the collector that holds the
`fleet_detection` lease (collector/cluster.py), over:

- its own streams' batches, as they are stored (fed like node-level detection's);
- every other collector's batches, read back from the database by id as they commit
  (`Store.batches_by_id`, checked again as ingest checks them);
- on taking the lease, the recent window of the other collectors' nodes from the database, and
  the fleet detectors' firing alerts, so it carries them on rather than opening them again.

Every collector feeds its own streams to its fleet detection all the time, so the data is there
when the lease moves to it; passes run only while it holds the lease, and on losing it the open
findings are dropped, not resolved (the new holder carries them on). The other detectors run on
every collector over the nodes streaming to it. With SQLite (one collector) none of this runs:
one detection loop runs every detector.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence

from google.protobuf.message import DecodeError

from fleetwatch.collector.detection import DetectionLoop, feed_recent, finding_from_alert, ib_sample
from fleetwatch.collector.storage.store import IngestBatch, Store, Targets
from fleetwatch.collector.validate import ClockWindow, InvalidMessage, check_batch
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.fold import CLOCK_DETECTORS, STRAGGLER_DETECTORS
from fleetwatch.detectors.model import Detector
from fleetwatch.v1 import telemetry_pb2 as pb

log = logging.getLogger(__name__)

# The job-level detectors, and the clock detectors whose findings their stragglers fold into.
FLEET_DETECTOR_IDS = STRAGGLER_DETECTORS | {"straggler.stage"} | CLOCK_DETECTORS
# After taking the lease, a carried-on finding is not closed for this long: agents of a dead
# collector take up to 10 s to move and then resend what it never stored, and a sustained rule
# (thermal: 80 % of 20 s) must see that data before it can say the condition ended.
TAKEOVER_HOLD_SECONDS = 30.0
# How long after a poll passed an id a lower one may still commit: a batch's insert and commit lie
# within one ingest commit (ingest_commit_wait_seconds, 0.2 s, plus the commit itself).
COMMIT_SLACK_SECONDS = 5.0
MAX_REMEMBERED_IDS = 200_000
MAX_IDS_LISTED = 50_000
# Batches read back a poll: at most ~2,000 nodes' 10 s batches (a poll every detection interval).
BATCHES_PER_POLL = 2000


def split_detectors(detectors: Sequence[Detector]) -> tuple[list[Detector], list[Detector]]:
    """(node-level, fleet-wide) detectors."""
    local = [d for d in detectors if d.id not in FLEET_DETECTOR_IDS]
    fleet = [d for d in detectors if d.id in FLEET_DETECTOR_IDS]
    return local, fleet


class FleetDetection:
    """The fleet-wide detectors' loop, fed from this collector's streams and the database."""

    def __init__(
        self,
        store: Store,
        detectors: Sequence[Detector],
        *,
        targets: Targets,
        interval_seconds: float,
        on_alerts_changed: Callable[[], None],
        active: Callable[[], bool],
        local_nodes: Callable[[], Collection[str]],
        window: ClockWindow,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.ids = frozenset(d.id for d in detectors)
        self.recent = RecentData.for_detectors(detectors)
        self.tracker = Tracker(detectors)
        self.loop = DetectionLoop(
            store,
            self.recent,
            self.tracker,
            targets=targets,
            interval_seconds=interval_seconds,
            on_alerts_changed=on_alerts_changed,
            clock=clock,
            active=active,
            name="fleet-detection",
        )
        self.local_nodes = local_nodes
        self.window = window
        self.clock = clock
        self._cursor: int | None = None  # batches.id read up to; None while not holding the lease
        # (monotonic time, highest id passed) of recent polls, and the ids read in that span.
        self._passed: deque[tuple[float, int]] = deque()
        self._read: OrderedDict[int, None] = OrderedDict()
        self._floor = 0  # every batch with an id up to this has been read or was before the lease
        self.batches_read = 0
        self.batches_refused = 0

    def feed_local(self, items: Sequence[IngestBatch], stored: Sequence[bool]) -> None:
        """This collector's stored batches (event loop): always, so a lease taken finds them there."""
        self.loop.feed(functools.partial(feed_recent, items=list(items), stored=list(stored)))

    def lease_changed(self, held: bool) -> None:
        """From the cluster's tick thread: take the fleet's findings over, or let them go."""
        if held:
            # Batches from here on are read as they commit; what came before, from the window.
            self._passed.clear()
            self._read.clear()
            self._cursor = self._floor = self.store.newest_batch_id()
            self.loop.feed(self._take_over)
        else:
            self._cursor = None
            self.loop.feed(self._let_go)
        self.loop.trigger()

    def _let_go(self, _recent: RecentData) -> None:
        """In the fleet detection thread: the new holder carries the open findings on."""
        self.tracker.forget()

    def _take_over(self, recent: RecentData) -> None:
        """In the fleet detection thread: the firing fleet alerts and other nodes' recent window."""
        firing = [a for a in self.store.firing_alerts() if a["detector"] in self.ids]
        now = self.clock()
        self.tracker.restore((finding_from_alert(a) for a in firing), hold_until=now + TAKEOVER_HOLD_SECONDS)
        local = set(self.local_nodes())
        since = now - recent.retention_seconds
        for node in self.store.nodes():
            name = node["node"]
            if name in local:
                continue  # fed from this collector's own streams all along
            recent.note_node(
                name,
                node["last_seen"],
                boot_id=node["boot_id"],
                sampling_interval_seconds=node["sampling_interval_seconds"],
            )
            for sample in self.store.gpu_samples_since(since, node=name):
                recent.add_gpu(sample)
            for host in self.store.host_samples_since(since, node=name):
                recent.add_host(host)
            for step in self.store.steps_since(now - recent.step_retention_seconds, node=name):
                recent.add_step(step)
            for event in self.store.events_since(now - recent.event_retention_seconds, node=name):
                recent.add_event(event)
            for port in self.store.ib_samples_since(since, node=name):
                recent.add_ib(ib_sample(name, port))
        log.info("fleet detection: carrying on %d firing alerts, every other collector's nodes loaded", len(firing))

    def poll(self) -> int:
        """Reads the batches other collectors stored since the last poll into fleet detection
        (blocking: a thread). Returns how many were read.

        Ids are handed out when a row is inserted, not when it commits: a batch with a lower id
        may become visible after a higher one was read. So ids are looked at again for
        COMMIT_SLACK_SECONDS after they were first passed, and each batch is read once.
        """
        cursor = self._cursor
        if cursor is None:
            return 0
        now = time.monotonic()
        while self._passed and now - self._passed[0][0] >= COMMIT_SLACK_SECONDS:
            self._floor = max(self._floor, self._passed.popleft()[1])  # long enough ago: all committed
        listed = self.store.batch_ids_after(max(self._floor, 0), MAX_IDS_LISTED)
        fresh = [i for i in listed if i not in self._read][:BATCHES_PER_POLL]
        if not fresh:
            return 0
        for row_id in fresh:
            self._read[row_id] = None
        while len(self._read) > MAX_REMEMBERED_IDS:
            self._read.popitem(last=False)
        self._passed.append((now, max(fresh)))
        rows = self.store.batches_by_id(fresh)
        local = set(self.local_nodes())
        items: list[IngestBatch] = []
        for row_id, node, boot_id, received_at, body in rows:
            cursor = max(cursor, row_id)
            if node in local:
                continue  # fed as it was stored here
            try:
                items.append(check_batch(node, boot_id, pb.Batch.FromString(body), received_at, self.window))
            except (InvalidMessage, DecodeError) as exc:  # checked when stored; a later version may differ
                self.batches_refused += 1
                log.debug("fleet detection: batch %d of %s not readable: %s", row_id, node, exc)
        if self._cursor is not None:  # the lease may have gone meanwhile
            self._cursor = cursor
        if items:
            self.loop.feed(functools.partial(feed_recent, items=items, stored=[True] * len(items)))
        self.batches_read += len(rows)
        return len(rows)
