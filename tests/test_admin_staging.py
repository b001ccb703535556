"""Staged membership changes: the plan computed from crafted views, the checks that refuse a
change, the stored form, the RPC methods on an in-process cluster (virtual time), and the
``kai-admin`` commands that stage, plan and commit (parsing and text rendering)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st

import kai.admin.__main__ as admin_cli
from kai.admin.changes import STAGED_META, MembershipChanges
from kai.admin.staging import (
    NOTHING_STAGED,
    ChangeRefused,
    Plan,
    StagedChange,
    StagedChanges,
    check_alone_and_empty,
    check_join,
    check_leave,
    check_remove,
    check_replace,
    check_seed,
    plan_changes,
    staged_view,
    transition_of,
)
from kai.core.errors import RpcBadRequest
from kai.core.membership import Member, MembershipView, Status
from kai.core.ring import NodeId
from kai.core.transition import SETTLED, Moves, Placement
from kai.testing.cluster import InProcessCluster

BUCKETS = 64
VIRTUAL_NODES = 128
A, B, C, D, X = (NodeId("127.0.0.1", 11011 + index) for index in range(5))


def view_of(**statuses: Status) -> MembershipView:
    """A view of nodes A.. by letter, each at version 1."""
    nodes = {"A": A, "B": B, "C": C, "D": D, "X": X}
    return MembershipView(
        tuple(
            sorted((Member(nodes[name], status, 1) for name, status in statuses.items()), key=str)
        )
    )


def everyone_up(node: NodeId) -> bool:
    return True


def plan_of(
    view: MembershipView,
    changes: Sequence[StagedChange],
    peer_views: Sequence[MembershipView] = (),
    is_up: Callable[[NodeId], bool] = everyone_up,
) -> Plan:
    return plan_changes(
        view,
        peer_views,
        StagedChanges(tuple(changes)),
        n=3,
        buckets=BUCKETS,
        virtual_nodes=VIRTUAL_NODES,
        is_up=is_up,
    )


# --- the plan -------------------------------------------------------------------------------


def test_a_join_moves_partitions_to_the_joiner_only_from_their_first_owner() -> None:
    cluster = view_of(A="valid", B="valid", C="valid")
    plan = plan_of(MembershipView.single(X), [StagedChange("join", X, A)], [cluster])
    assert plan.refusal is None
    assert plan.current == (A, B, C)
    assert plan.next == (A, B, C, X)
    assert plan.view.member(X) == Member(X, "joining", 2)
    expected = Moves.of(plan.view, 3, buckets=BUCKETS, virtual_nodes=VIRTUAL_NODES)
    assert len(plan.moves) == expected.count()
    assert 0 < len({move.partition for move in plan.moves}) < BUCKETS
    for move in plan.moves:
        assert move.target == X
        assert move.source == expected.current.primaries(move.partition, 3)[0]


def test_a_source_that_is_down_is_passed_over_for_the_next_owner() -> None:
    cluster = view_of(A="valid", B="valid", C="valid")
    everyone = plan_of(MembershipView.single(X), [StagedChange("join", X, A)], [cluster])
    without_a = plan_of(
        MembershipView.single(X), [StagedChange("join", X, A)], [cluster], lambda n: n != A
    )
    assert [m.partition for m in without_a.moves] == [m.partition for m in everyone.moves]
    assert A in {move.source for move in everyone.moves}
    assert A not in {move.source for move in without_a.moves}
    nobody = plan_of(
        MembershipView.single(X), [StagedChange("join", X, A)], [cluster], lambda n: False
    )
    assert {move.source for move in nobody.moves} == {None}
    assert nobody.sources() == {}


def test_removing_a_dead_member_copies_its_partitions_from_the_survivors() -> None:
    view = view_of(A="valid", B="valid", C="valid", D="valid")
    plan = plan_of(view, [StagedChange("remove", D)], is_up=lambda node: node != D)
    assert plan.refusal is None
    assert plan.next == (A, B, C)
    assert plan.moves
    assert all(move.source not in (D, None) and move.target != D for move in plan.moves)
    partitions = [move.partition for move in plan.moves]
    assert len(partitions) == len(set(partitions))  # one new owner per partition D had
    sent = plan.sources()
    assert sorted(p for parts in sent.values() for p in parts) == sorted(partitions)


def test_a_replacement_joins_at_a_version_above_its_own_entry() -> None:
    view = view_of(A="valid", B="valid", C="valid")
    new_view = MembershipView.single(D)
    replace = StagedChanges((StagedChange("replace", C, D),))
    merged = staged_view(view, [new_view], replace)
    assert merged.member(C) == Member(C, "leaving", 2)
    assert merged.member(D) == Member(D, "joining", 2)
    # Gossiped to the replacement, the joining status wins over its own "valid, version 1"...
    assert new_view.merge(merged).member(D).status == "joining"  # type: ignore[union-attr]
    # ...which it would not without its view merged first: equal versions, valid wins.
    unmerged = staged_view(view, [], replace)
    assert new_view.merge(unmerged).member(D).status == "valid"  # type: ignore[union-attr]


def test_a_plan_that_leaves_no_node_on_the_ring_or_stages_nothing_is_refused() -> None:
    alone = MembershipView.single(A)
    refusal = plan_of(alone, [StagedChange("leave", A)]).refusal
    assert refusal is not None
    assert refusal.startswith("the staged changes would leave no node on the ring")
    nothing = plan_of(view_of(A="valid", B="valid"), [])
    assert nothing.refusal == NOTHING_STAGED
    assert nothing.moves == ()
    # The last node can still be replaced.
    assert (
        plan_of(alone, [StagedChange("replace", A, B)], [MembershipView.single(B)]).refusal is None
    )


def test_the_described_plan_totals_the_known_sizes_and_counts_the_unknown() -> None:
    cluster = view_of(A="valid", B="valid", C="valid")
    plan = plan_of(MembershipView.single(X), [StagedChange("join", X, A)], [cluster])
    first, second, *rest = plan.moves
    assert first.source is not None
    assert second.source is not None
    sizes = {(first.source, first.partition): (3, 300), (second.source, second.partition): (1, 7)}
    described: Any = plan.describe(sizes)
    assert described["keys"] == 4
    assert described["bytes"] == 307
    assert described["sizes_unknown"] == len(rest)
    assert described["copies"] == len(plan.moves)
    assert described["moves"][0] == {
        "partition": first.partition,
        "from": str(first.source),
        "to": str(X),
        "keys": 3,
        "bytes": 300,
    }
    assert described["moves"][2]["keys"] is None
    assert described["staged"] == [
        {"action": "join", "node": str(X), "seed": str(A), "statuses": {str(X): "joining"}}
    ]
    assert "moves" not in plan.summary()


def test_the_transition_under_way_is_described_until_it_settles() -> None:
    view = view_of(A="valid", B="valid", X="joining")
    moves = Moves.of(view, 3, buckets=BUCKETS, virtual_nodes=VIRTUAL_NODES)
    copying = transition_of(Placement.of(view, moves))
    assert copying is not None
    assert copying["phase"] == "copying"
    assert copying["copies"] == copying["copies_missing"] == moves.count() > 0
    assert copying["next_ring"] == [str(A), str(B), str(X)]
    settled = view_of(A="valid", B="valid")
    placement = Placement.of(
        settled, Moves.of(settled, 3, buckets=BUCKETS, virtual_nodes=VIRTUAL_NODES)
    )
    assert placement.phase == SETTLED
    assert transition_of(placement) is None


# --- the checks -----------------------------------------------------------------------------


def test_only_a_node_alone_and_empty_can_join() -> None:
    with pytest.raises(ChangeRefused, match=r"holds 3 records; only an empty node can join"):
        check_join(X, MembershipView.single(X), 3)
    with pytest.raises(ChangeRefused, match=r"holds 1 record;"):
        check_join(X, MembershipView.single(X), 1)
    with pytest.raises(ChangeRefused, match=r"already in a cluster, with 127.0.0.1:11011;"):
        check_join(X, view_of(A="valid", X="valid"), 0)
    check_join(X, MembershipView.single(X), 0)
    check_join(X, view_of(A="left", X="joining"), 0)  # a left member is no cluster
    with pytest.raises(ChangeRefused, match="cannot join itself"):
        StagedChange("join", X, X)
    with pytest.raises(ChangeRefused, match="has left its cluster"):
        check_seed(A, view_of(A="left", B="valid"))
    check_seed(A, view_of(A="valid"))


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("joining", "is still joining: wait until `kai-admin status` shows phase settled"),
        ("leaving", "is already leaving"),
        ("left", "has left the cluster already"),
    ],
)
def test_only_a_valid_member_can_leave_be_removed_or_be_replaced(
    status: Status, message: str
) -> None:
    view = view_of(A="valid", B=status)
    with pytest.raises(ChangeRefused, match=message):
        check_leave(B, view)
    with pytest.raises(ChangeRefused, match=message):
        check_remove(A, view, B)
    with pytest.raises(ChangeRefused, match=message):
        check_replace(view, B, X)
    check_leave(A, view)
    check_remove(B, view, A)


def test_remove_refuses_the_node_asked_and_unknown_nodes() -> None:
    view = view_of(A="valid", B="valid", C="left")
    with pytest.raises(ChangeRefused, match=r"is the node asked; to retire it, use leave"):
        check_remove(A, view, A)
    with pytest.raises(
        ChangeRefused,
        match=r"127.0.0.1:11015 is not a member of this cluster \(members: 127.0.0.1:11011, "
        r"127.0.0.1:11012\)$",
    ):
        check_remove(A, view, X)


def test_a_replacement_must_be_new_alone_and_empty() -> None:
    view = view_of(A="valid", B="valid", C="left")
    with pytest.raises(ChangeRefused, match="already a member of this cluster"):
        check_replace(view, A, B)
    check_replace(view, A, C)  # a node that left may come back, on a fresh data directory
    with pytest.raises(ChangeRefused, match="cannot replace itself"):
        StagedChange("replace", A, A)
    with pytest.raises(ChangeRefused, match=r"holds 2 records; only an empty node can replace"):
        check_alone_and_empty(X, MembershipView.single(X), 2, what=f"replace {A}")
    with pytest.raises(ChangeRefused, match="only a node on its own can replace"):
        check_alone_and_empty(X, view_of(D="valid", X="valid"), 0, what=f"replace {A}")


# --- the staged changes and their stored form -----------------------------------------------


def test_a_change_supersedes_the_staged_ones_that_touch_its_nodes() -> None:
    staged = StagedChanges().with_change(StagedChange("remove", C))
    staged = staged.with_change(StagedChange("replace", B, D))
    staged = staged.with_change(StagedChange("leave", A))
    assert staged.statuses() == {C: "leaving", B: "leaving", D: "joining", A: "leaving"}
    assert staged.peers() == (D,)
    staged = staged.with_change(StagedChange("remove", D))  # D was the replacement
    assert [str(change) for change in staged.changes] == [
        "remove 127.0.0.1:11013",
        "leave 127.0.0.1:11011",
        "remove 127.0.0.1:11014",
    ]
    assert len(staged.without([StagedChange("leave", A)])) == 2


def test_staged_changes_round_trip_through_their_stored_form() -> None:
    staged = StagedChanges(
        (StagedChange("join", X, A), StagedChange("replace", B, D), StagedChange("remove", C))
    )
    assert StagedChanges.from_bytes(staged.to_bytes()) == staged
    assert StagedChanges.from_bytes(StagedChanges().to_bytes()) == StagedChanges()


@pytest.mark.parametrize(
    "rows",
    [
        {"not": "a list"},
        [["join", "127.0.0.1", 11011, None, None]],  # a join names its seed
        [["leave", "127.0.0.1", 11011, "127.0.0.1", 11012]],
        [["frobnicate", "127.0.0.1", 11011, None, None]],
        [["remove", "localhost", 11011, None, None]],
        [["remove", "127.0.0.1", 11011]],
    ],
)
def test_a_bad_stored_form_is_a_value_error(rows: object) -> None:
    with pytest.raises(ValueError, match="staged change"):
        StagedChanges.from_bytes(msgpack.packb(rows))


fields = st.one_of(
    st.none(),
    st.integers(-2, 70000),
    st.sampled_from(["join", "leave", "remove", "replace", "127.0.0.1", "x"]),
)


@given(st.one_of(st.binary(max_size=64), st.lists(st.lists(fields, max_size=6), max_size=4)))
def test_any_stored_bytes_give_staged_changes_or_a_value_error(data: bytes | list[Any]) -> None:
    raw = data if isinstance(data, bytes) else msgpack.packb(data)
    try:
        staged = StagedChanges.from_bytes(raw)
    except ValueError:
        return
    assert StagedChanges.from_bytes(staged.to_bytes()) == staged


def test_the_staging_module_imports_no_io_framework() -> None:
    code = (
        "import sys, kai.admin.staging\n"
        "print(','.join(m for m in ('trio', 'plyvel', 'socket') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


# --- the RPC methods, on an in-process cluster ------------------------------------------------


def with_changes(cluster: InProcessCluster) -> list[MembershipChanges]:
    """Every node's staging methods, registered next to its peer methods."""
    every = []
    for node in cluster.nodes:
        changes = MembershipChanges(node.cluster)
        cluster.network.register(node.node_id, {**node.cluster.handlers(), **changes.handlers()})
        every.append(changes)
    return every


def settled(cluster: InProcessCluster, indexes: Sequence[int], members: set[NodeId]) -> bool:
    for index in indexes:
        node = cluster.nodes[index].cluster
        placement = node.placement()
        if placement.phase != SETTLED or set(placement.ring.nodes) != members:
            return False
        statuses = {m.node: m.status for m in node.membership.view.members}
        if any(statuses[member] != "valid" for member in members):
            return False
    return True


async def wait_settled(
    cluster: InProcessCluster, indexes: Sequence[int], members: set[NodeId]
) -> None:
    with trio.fail_after(120):
        while not settled(cluster, indexes, members):  # noqa: ASYNC110 (virtual time)
            await trio.sleep(0.1)


async def write(cluster: InProcessCluster, index: int, keys: Sequence[bytes]) -> None:
    for key in keys:
        reply = await cluster.request(index, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(key), key))
        assert reply == b"STORED\r\n", key


async def assert_readable(cluster: InProcessCluster, index: int, keys: Sequence[bytes]) -> None:
    for key in keys:
        reply = await cluster.request(index, b"get %s\r\n" % key)
        assert reply.split(b"\r\n")[1:2] == [key], (index, key, reply)


async def test_a_dead_member_is_removed_as_planned_and_every_key_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = [b"staged:%03d" % index for index in range(200)]
    async with InProcessCluster.running(4, settings={"anti_entropy": False}) as cluster:
        ids = [cluster.node_id(index) for index in range(4)]
        await wait_settled(cluster, range(4), set(ids))
        changes = with_changes(cluster)
        await write(cluster, 0, keys)
        await trio.sleep(1)  # every replica's write answered (W is 2 of 3)
        cluster.crash(3)
        detector = cluster.nodes[0].cluster.detector
        with trio.fail_after(30):
            while detector.is_up(ids[3]):  # noqa: ASYNC110 (virtual time)
                await trio.sleep(0.1)
        with pytest.raises(RpcBadRequest, match="nothing is staged"):
            await changes[0].commit()

        staged = await changes[0].stage_remove(str(ids[3]))
        assert staged["committed"] is False
        assert staged["change"] == {
            "action": "remove",
            "node": str(ids[3]),
            "statuses": {str(ids[3]): "leaving"},
        }
        # Kept in the metadata: a restarted node still has it staged.
        engine = cluster.nodes[0].engine
        assert engine.get_meta(STAGED_META) is not None
        assert MembershipChanges(cluster.nodes[0].cluster).staged == changes[0].staged
        assert cluster.nodes[0].cluster.membership.view.member(ids[3]).status == "valid"  # type: ignore[union-attr]

        plan: Any = await changes[0].plan()
        ring = cluster.nodes[0].cluster.ring()
        per_partition: dict[int, int] = {}
        for key in keys:
            partition = ring.partition_for_key(key)
            per_partition[partition] = per_partition.get(partition, 0) + 1
        assert plan["refusal"] is None
        assert plan["transition"] is None
        assert plan["next_ring"] == [str(node) for node in ids[:3]]
        assert plan["moves"]
        assert plan["sizes_unknown"] == 0
        for move in plan["moves"]:
            assert move["from"] in [str(node) for node in ids[:3]]
            assert move["to"] != str(ids[3])
            assert move["keys"] == per_partition.get(move["partition"], 0), move
        assert plan["keys"] == sum(per_partition.get(m["partition"], 0) for m in plan["moves"])

        committed = await changes[0].commit()
        assert committed["committed"] is True
        assert committed["copies"] == len(plan["moves"])
        assert changes[0].staged == StagedChanges()
        await wait_settled(cluster, range(3), set(ids[:3]))
        assert cluster.nodes[0].cluster.membership.view.member(ids[3]).status == "left"  # type: ignore[union-attr]
        for index in range(3):
            await assert_readable(cluster, index, keys)


async def test_a_one_command_change_commits_alone_and_a_stale_one_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = [b"alone:%03d" % index for index in range(50)]
    async with InProcessCluster.running(4) as cluster:
        ids = [cluster.node_id(index) for index in range(4)]
        await wait_settled(cluster, range(4), set(ids))
        changes = with_changes(cluster)
        await write(cluster, 1, keys)
        with pytest.raises(RpcBadRequest, match="use leave"):
            await changes[0].stage_remove(str(ids[0]))
        with pytest.raises(RpcBadRequest, match="is not a member of this cluster"):
            await changes[0].stage_remove("127.0.0.1:1")
        with pytest.raises(RpcBadRequest, match="HOST:PORT"):
            await changes[0].stage_remove(11012)
        with pytest.raises(RpcBadRequest, match=r"holds \d+ records; only an empty node can join"):
            await changes[0].stage_join(str(ids[1]))
        with pytest.raises(RpcBadRequest, match="commit must be true or false"):
            await changes[0].stage_leave("yes")

        await changes[0].stage_remove(str(ids[2]))
        left = await changes[0].stage_leave(True)  # node 0 leaves now; the remove stays
        assert left["committed"] is True
        assert left["next_ring"] == [str(node) for node in ids[1:]]
        assert [change["action"] for change in changes[0].staged.describe()] == ["remove"]
        await wait_settled(cluster, [1, 2, 3], set(ids[1:]))
        assert cluster.nodes[1].cluster.membership.view.member(ids[0]).status == "left"  # type: ignore[union-attr]

        # Node 2 leaves by itself: the remove staged on node 0 no longer applies.
        await changes[2].stage_leave(True)
        await wait_settled(cluster, [1, 3], {ids[1], ids[3]})
        with trio.fail_after(30):
            while cluster.nodes[0].cluster.membership.view.member(ids[2]).status != "left":  # type: ignore[union-attr]  # noqa: ASYNC110
                await trio.sleep(0.1)
        with pytest.raises(RpcBadRequest, match=r"the staged remove 127.0.0.1:11013 no longer"):
            await changes[0].commit()
        assert changes[0].staged == StagedChanges()
        for index in (1, 3):
            await assert_readable(cluster, index, keys)


# --- the command line ------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.secret"
    path.write_bytes(b"s" * 32)
    path.chmod(0o600)
    return path


class FakeNode:
    """Stands in for ``call_node``: records each call and answers ``reply``."""

    def __init__(self, reply: object) -> None:
        self.reply = reply
        self.calls: list[tuple[object, ...]] = []

    async def __call__(self, address: object, secret: bytes, method: str, *params: object) -> Any:
        self.calls.append((method, *params))
        return self.reply


def run_admin(
    monkeypatch: pytest.MonkeyPatch, secret: Path, reply: object, *argv: str
) -> tuple[int, str, list[tuple[object, ...]]]:
    node = FakeNode(reply)
    monkeypatch.setattr(admin_cli, "call_node", node)
    printed: list[str] = []
    status = admin_cli.main(["--secret-file", str(secret), *argv], out=printed.append)
    return status, "\n".join(printed), node.calls


STAGED_JOIN = {
    "node": str(X),
    "change": {"action": "join", "node": str(X), "seed": str(A), "statuses": {}},
    "staged": [{"action": "join", "node": str(X), "seed": str(A), "statuses": {}}],
    "committed": False,
}


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["join", "127.0.0.1:11011"], ("stage_join", "127.0.0.1:11011", False)),
        (["join", "127.0.0.1:11011", "--commit"], ("stage_join", "127.0.0.1:11011", True)),
        (["leave"], ("stage_leave", False)),
        (["leave", "--commit", "--json"], ("stage_leave", True)),
        (["remove", "127.0.0.1:11013"], ("stage_remove", "127.0.0.1:11013", False)),
        (
            ["replace", "127.0.0.1:11013", "127.0.0.1:11016", "--commit"],
            ("stage_replace", "127.0.0.1:11013", "127.0.0.1:11016", True),
        ),
        (["plan"], ("plan",)),
        (["commit"], ("commit",)),
        (["clear"], ("clear_staged",)),
    ],
)
def test_each_membership_command_calls_its_method(
    monkeypatch: pytest.MonkeyPatch, secret: Path, argv: list[str], call: tuple[object, ...]
) -> None:
    replies: dict[str, object] = {
        "plan": plan_reply(0),
        "clear_staged": {"cleared": []},
        "commit": committed_reply(),
    }
    status, _text, calls = run_admin(
        monkeypatch, secret, replies.get(str(call[0]), STAGED_JOIN), *argv
    )
    assert status == 0
    assert calls == [call]


def test_a_staged_change_says_what_to_run_next(
    monkeypatch: pytest.MonkeyPatch, secret: Path
) -> None:
    status, text, _calls = run_admin(monkeypatch, secret, STAGED_JOIN, "join", "127.0.0.1:11011")
    assert status == 0
    assert text.splitlines() == [
        f"staged: join {X} to the cluster of {A}",
        f"1 change staged on {X}: see `kai-admin --node {X} plan`, then apply with "
        f"`kai-admin --node {X} commit`",
    ]


def plan_reply(moves: int, *, transition: object = None) -> dict[str, object]:
    return {
        "staged": [{"action": "remove", "node": str(D), "statuses": {str(D): "leaving"}}],
        "n": 3,
        "current_ring": [str(A), str(B), str(C), str(D)],
        "next_ring": [str(A), str(B), str(C)],
        "partitions_moving": moves,
        "copies": moves,
        "refusal": None,
        "keys": 10 * moves,
        "bytes": 100 * moves,
        "sizes_unknown": 1 if moves else 0,
        "moves": [
            {
                "partition": index,
                "from": str(A),
                "to": str(B),
                "keys": None if index == 0 else 10,
                "bytes": None if index == 0 else 100,
            }
            for index in range(moves)
        ],
        "transition": transition,
    }


def committed_reply() -> dict[str, object]:
    return {
        **{k: v for k, v in plan_reply(3).items() if k not in ("moves", "keys", "bytes")},
        "committed": True,
        "warnings": ["127.0.0.1:11014 did not answer gossip yet; gossip keeps trying"],
    }


def test_a_text_plan_is_a_table_capped_at_fifty_moves(
    monkeypatch: pytest.MonkeyPatch, secret: Path
) -> None:
    status, text, _calls = run_admin(monkeypatch, secret, plan_reply(60), "plan")
    assert status == 0
    lines = text.splitlines()
    assert lines[:5] == [
        "staged changes:",
        f"  remove {D}",
        f"ring now:   {A} {B} {C} {D}",
        f"ring after: {A} {B} {C}",
        "60 partitions move (60 copies, N=3): 600 keys, 6000 bytes (1 of unknown size)",
    ]
    assert lines[5].split() == ["partition", "from", "to", "keys", "bytes"]
    assert lines[6].split() == ["0", str(A), str(B), "?", "?"]
    assert lines[7].split() == ["1", str(A), str(B), "10", "100"]
    # The staged change, the header, the first moves and what is left out.
    assert len([line for line in lines if line.startswith("  ")]) == 3 + admin_cli.PLAN_LINES
    assert "  … and 10 more (--json lists them all)" in lines
    assert lines[-1] == "apply with `kai-admin commit`, or drop with `kai-admin clear`"
    status, json_text, _calls = run_admin(monkeypatch, secret, plan_reply(60), "plan", "--json")
    assert json_text.count('"partition"') == 60


def test_a_plan_shows_the_transition_under_way_and_a_refusal(
    monkeypatch: pytest.MonkeyPatch, secret: Path
) -> None:
    transition = {"phase": "copying", "copies": 40, "copies_missing": 12}
    idle = {**plan_reply(0, transition=transition), "staged": []}
    _status, text, _calls = run_admin(monkeypatch, secret, idle, "plan")
    assert text.splitlines() == [
        "nothing staged",
        "transition under way: copying, 12 of 40 copies missing",
    ]
    refused = {**plan_reply(0), "refusal": "the staged changes would leave no node on the ring"}
    _status, text, _calls = run_admin(monkeypatch, secret, refused, "plan")
    assert text.splitlines()[-1] == (
        "commit would be refused: the staged changes would leave no node on the ring"
    )


def test_a_commit_says_what_moves_and_any_warning(
    monkeypatch: pytest.MonkeyPatch, secret: Path
) -> None:
    status, text, _calls = run_admin(monkeypatch, secret, committed_reply(), "commit")
    assert status == 0
    assert text.splitlines() == [
        f"committed: remove {D}",
        f"ring after: {A} {B} {C}",
        "3 partitions move (3 copies); follow them with `kai-admin status` (phase, copies "
        "pending) and `kai-admin transfers`",
        "warning: 127.0.0.1:11014 did not answer gossip yet; gossip keeps trying",
    ]


def test_a_refused_change_is_one_line_and_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Refusing(FakeNode):
        async def __call__(self, *args: object) -> Any:
            raise RpcBadRequest("127.0.0.1:11011 is the node asked; to retire it, use leave")

    monkeypatch.setattr(admin_cli, "call_node", Refusing(None))
    assert admin_cli.main(["--secret-file", str(secret), "remove", "127.0.0.1:11011"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "kai-admin: 127.0.0.1:11011 answered remove with an error: 127.0.0.1:11011 is the node "
        "asked; to retire it, use leave\n"
    )


def test_membership_commands_wait_longer_than_reads() -> None:
    assert admin_cli._timeout_of("plan") == admin_cli.CHANGE_TIMEOUT
    assert admin_cli._timeout_of("replace") == admin_cli.CHANGE_TIMEOUT
    assert admin_cli._timeout_of("status") == admin_cli.CALL_TIMEOUT


def test_replace_needs_old_and_new(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        admin_cli.build_parser().parse_args(["replace", "127.0.0.1:11013"])
    assert exited.value.code == 2
    assert "NEW" in capsys.readouterr().err
