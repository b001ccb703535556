"""A real network partition, healed: every replica converges with no client traffic.

Three kai processes run in network namespaces of their own (:class:`kai.testing.netns.NetnsLab`),
each listening on its namespace's address, which is also its ring identity. Node 3 is cut
off from the other two by iptables DROP rules both ways for ten seconds while writers go
through node 1 (acknowledged: W=2 is met with node 2) and through node 3 (SERVER_ERROR: W=2
cannot be met, but node 3 stores each write itself). After the heal no client request is
sent; the test reads each replica alone through its ``replica_read`` RPC (a quorum read
would repair what it reads) until all three hold byte-identical records of every key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from kai.core.versions import decode_siblings
from kai.testing.netns import NetnsLab

from .conftest import IO_TIMEOUT, RawConnection
from .netns_cluster import PORT, NetnsCluster, running

pytestmark = pytest.mark.system
logger = logging.getLogger(__name__)

SYNC_INTERVAL_MS = 500
REQUEST_TIMEOUT_MS = 2000
CONFIG = f"""
quorum = "3,2,2"
request_timeout = {REQUEST_TIMEOUT_MS}
membership_interval = 200
sync_interval = {SYNC_INTERVAL_MS}
handoff_interval = 1000
buckets = 64
"""
#: How long node 3 is cut off while the writers run.
PARTITION_SECONDS = 10.0
#: Writes through node 1 per second (paced, so they span the whole partition), and at most.
SIDE_ONE_RATE = 150
SIDE_ONE_LIMIT = int(SIDE_ONE_RATE * PARTITION_SECONDS) + 100
#: Writers through node 3; each write there waits out the request timeout.
SIDE_THREE_WRITERS = 4
SIDE_THREE_LIMIT = 50
#: Convergence within three sync intervals, plus slack for a loaded machine.
CONVERGENCE_BUDGET = 3 * SYNC_INTERVAL_MS / 1000
CONVERGENCE_SLACK = 25.0


@pytest.fixture
def cluster(lab: NetnsLab, tmp_path: Path) -> Iterator[NetnsCluster]:
    with running(lab, tmp_path, CONFIG) as nodes:
        yield nodes


def healing_stats(cluster: NetnsCluster) -> str:
    wanted = ("kai_curr_nodes", "kai_hints_pending", "kai_hints_stored", "kai_hints_delivered")
    lines = []
    for index in range(len(cluster.nodes)):
        try:
            fields = cluster.stats(index)
        except OSError as exc:
            lines.append(f"node {index + 1}: stats failed: {exc}")
            continue
        shown = {
            name: value
            for name, value in fields.items()
            if name in wanted or name.startswith(("kai_transfer", "kai_anti", "kai_sync"))
        }
        lines.append(f"node {index + 1}: {shown}")
    return "\n".join(lines)


@attrs.define
class Writes:
    """What a writer sent where, and what each write was answered."""

    #: key -> value sent
    sent: dict[bytes, bytes] = attrs.Factory(dict)
    #: key -> the reply line (b"STORED", b"SERVER_ERROR ...") or the client's error
    replies: dict[bytes, str] = attrs.Factory(dict)
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def acknowledged(self) -> dict[bytes, bytes]:
        return {key: self.sent[key] for key, reply in self.replies.items() if reply == "STORED"}

    def answered(self) -> dict[bytes, bytes]:
        """Writes the node answered (so it has stored them, acknowledged or not)."""
        return {
            key: self.sent[key]
            for key, reply in self.replies.items()
            if reply == "STORED" or reply.startswith("SERVER_ERROR")
        }


def write_keys(
    host: str, keys: Sequence[bytes], writes: Writes, stop: threading.Event, *, rate: float | None
) -> None:
    """Set each key to a value naming it, one at a time, until ``stop`` (bounded by ``keys``).

    With ``rate``, key ``i`` is sent no earlier than ``i / rate`` s after the start, so the
    writes span the partition. A client-side error is recorded and the connection reopened.
    """
    started = time.monotonic()
    connection: RawConnection | None = None
    try:
        for index, key in enumerate(keys):
            if rate is not None:
                stop.wait(max(0.0, started + index / rate - time.monotonic()))  # pacing
            if stop.is_set():
                return
            value = b"written-through-" + host.encode() + b"-" + key
            with writes.lock:
                writes.sent[key] = value
            try:
                if connection is None:
                    connection = RawConnection(PORT, host=host, timeout=IO_TIMEOUT)
                reply = connection.request(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
                outcome = reply.rstrip(b"\r\n").decode(errors="replace")
            except OSError as exc:
                outcome = f"client error: {exc!r}"
                if connection is not None:
                    connection.close()
                connection = None
            with writes.lock:
                writes.replies[key] = outcome
    finally:
        if connection is not None:
            connection.close()


def values_of(record: bytes) -> list[bytes | None]:
    """The values of a record's versions (one, for a key written once)."""
    return [version.value for version in decode_siblings(record)]


def test_a_healed_partition_converges_on_every_replica_with_no_client_traffic(
    lab: NetnsLab, cluster: NetnsCluster
) -> None:
    side_one = Writes()
    side_three = Writes()
    stop = threading.Event()
    one_keys = [b"side1:%05d" % index for index in range(SIDE_ONE_LIMIT)]
    threads = [
        threading.Thread(
            target=write_keys,
            args=(lab.addresses[0], one_keys, side_one, stop),
            kwargs={"rate": SIDE_ONE_RATE},
        )
    ]
    for writer in range(SIDE_THREE_WRITERS):
        three_keys = [b"side3:%d:%03d" % (writer, index) for index in range(SIDE_THREE_LIMIT)]
        threads.append(
            threading.Thread(
                target=write_keys,
                args=(lab.addresses[2], three_keys, side_three, stop),
                kwargs={"rate": None},
            )
        )

    lab.isolate(2)
    partitioned = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        stop.wait(PARTITION_SECONDS)  # the partition's length: the writers run meanwhile
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a writer did not stop"

    one_acknowledged = side_one.acknowledged()
    three_answered = side_three.answered()
    logger.info(
        "replies through node 1: %s; through node 3: %s",
        Counter(reply.split(" ")[0] for reply in side_one.replies.values()),
        Counter(reply.split(" ")[0] for reply in side_three.replies.values()),
    )
    assert len(one_acknowledged) >= SIDE_ONE_RATE * PARTITION_SECONDS / 2, side_one.replies
    assert three_answered, f"node 3 answered no write: {side_three.replies}"
    assert not side_three.acknowledged(), "node 3 acknowledged a write it could not replicate"
    # The partition held: neither side has the other's writes yet (checked before the heal,
    # replica by replica, so nothing is repaired by looking).
    assert cluster.replica(2, list(one_acknowledged)) == [None] * len(one_acknowledged)
    for index in (0, 1):
        assert cluster.replica(index, list(three_answered)) == [None] * len(three_answered)

    lab.heal()
    healed = time.monotonic()
    logger.info(
        "partition of %.1f s healed: %d acknowledged writes through node 1, %d answered "
        "(SERVER_ERROR) through node 3",
        healed - partitioned,
        len(one_acknowledged),
        len(three_answered),
    )

    # Every key either side was sent: each node must have answered it (or the client
    # failed, and then the three replicas must merely agree).
    expected = {**side_one.answered(), **three_answered}
    every_key = sorted({*side_one.sent, *side_three.sent})
    last_gaps: list[str] = []

    def converged() -> bool:
        records = [cluster.replica(index, every_key) for index in range(3)]
        gaps = []
        for position, key in enumerate(every_key):
            held = [replica[position] for replica in records]
            wanted = expected.get(key)
            if wanted is not None:
                missing = [
                    index + 1
                    for index, record in enumerate(held)
                    if record is None or values_of(record) != [wanted]
                ]
                if missing:
                    gaps.append(f"{key!r} missing or different on nodes {missing}")
                    continue
            if len(set(held)) != 1:
                gaps.append(f"{key!r} records differ: {held}")
        last_gaps[:] = gaps
        return not gaps

    deadline = CONVERGENCE_BUDGET + CONVERGENCE_SLACK
    while not converged():
        waited = time.monotonic() - healed
        if waited >= deadline:
            pytest.fail(
                f"{len(last_gaps)} of {len(every_key)} keys not converged {waited:.2f} s after "
                f"the heal (deadline {CONVERGENCE_BUDGET} s budget + {CONVERGENCE_SLACK} s "
                f"slack), e.g. {last_gaps[:10]}\n{healing_stats(cluster)}"
            )
        time.sleep(0.2)  # poll interval of a deadline-bounded wait
    took = time.monotonic() - healed
    logger.info(
        "all three replicas converged %.2f s after the heal (budget %.1f s)",
        took,
        CONVERGENCE_BUDGET,
    )
    logger.info("stats after convergence:\n%s", healing_stats(cluster))
    # Every acknowledged write is among what converged, with its value.
    assert set(one_acknowledged) <= set(expected), "an acknowledged key went unchecked"
    assert took <= deadline, f"converged in {took:.2f} s, over the {deadline} s deadline"
