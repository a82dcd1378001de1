"""When a node republishes its RTTs: its first at once, then at a pace that bounds the whole mesh's."""

from __future__ import annotations

from meshllm.gossip.rtt import RttPublisher


def test_a_new_node_publishes_its_first_measurement_at_the_next_check() -> None:
    pub = RttPublisher(check_every=5.0, rate=0.5)
    links = {"a", "b", "c"}
    assert not pub.due(0.0, {}, {}, links, members=100)  # nothing measured yet
    assert not pub.due(2.0, {"a": 1.0}, {}, links, members=100)  # checks every 5 s
    assert pub.due(5.0, {"a": 1.0}, {}, links, members=100)
    assert not pub.due(10.0, {"a": 1.0, "b": 1.0}, {"a": 1.0}, links, members=100)  # then it holds down


def test_after_the_first_a_new_link_waits_for_a_hold_down_that_grows_with_the_mesh() -> None:
    pub = RttPublisher(check_every=5.0, rate=0.5)
    published = {"a": 1.0, "b": 1.0}
    assert pub.due(0.0, published, {}, {"a", "b"}, members=100)
    measured = {**published, "d": 2.0}  # a join moved this node's links: d is new
    assert pub.hold(100) == 200.0
    for now in range(5, 200, 5):
        assert not pub.due(float(now), measured, published, {"a", "d"}, members=100)
    assert pub.due(200.0, measured, published, {"a", "d"}, members=100)


def test_a_small_mesh_republishes_within_seconds() -> None:
    pub = RttPublisher(check_every=5.0, rate=0.5)
    assert pub.due(0.0, {"a": 1.0}, {}, {"a"}, members=3)
    assert pub.hold(3) == 6.0
    assert not pub.due(5.0, {"a": 1.0, "b": 1.0}, {"a": 1.0}, {"a", "b"}, members=3)
    assert pub.due(10.0, {"a": 1.0, "b": 1.0}, {"a": 1.0}, {"a", "b"}, members=3)


def test_a_lost_link_or_jitter_is_not_news_but_a_large_drift_is_after_the_refresh() -> None:
    pub = RttPublisher(check_every=5.0, rate=0.5, refresh=300.0)
    published = {"a": 10.0, "b": 10.0}
    assert pub.due(0.0, published, {}, {"a", "b"}, members=4)
    assert not pub.due(50.0, {"a": 10.0}, published, {"a"}, members=4)  # b went away: its RTT stays
    assert not pub.due(100.0, {"a": 12.0, "b": 10.0}, published, {"a", "b"}, members=4)  # jitter
    assert not pub.due(200.0, {"a": 40.0, "b": 10.0}, published, {"a", "b"}, members=4)  # drift, too soon
    assert pub.due(300.0, {"a": 40.0, "b": 10.0}, published, {"a", "b"}, members=4)
