"""Unit tests of ``csgd_cli.rules.groups``: members, segments, selection, cluster checks, describe."""

from __future__ import annotations

import dataclasses

import pytest

from csgd_cli.common.errors import CsgdError
from csgd_cli.rules.groups import (
    ChannelGroup,
    Consumer,
    Member,
    Producer,
    canonical,
    check_clusters,
    cluster_labels,
    describe,
    producer,
    prunable,
    reader,
    segment_of,
    select_groups,
)


def _concat_group() -> ChannelGroup:
    """Two convs concatenated into 6 channels (a: 0-3, b: 4-5), one BN over the whole
    concatenation, and a conv reading it: two segments."""
    return ChannelGroup(
        "cat",
        6,
        [
            Member("a", "out", length=4),
            Member("b", "out", start=4),
            Member("bn", "channel"),
            Member("next", "in"),
        ],
    )


def _one_error(match: str, groups: list[ChannelGroup], clusters: object, where: str = "") -> str:
    with pytest.raises(CsgdError, match=match) as e:
        check_clusters(groups, clusters, where)
    msg = str(e.value)
    assert "\n" not in msg and "csgd cluster" in msg  # one line, naming the fix
    return msg


# -- Member ---------------------------------------------------------------------------------
def test_member_span_runs_to_the_end_unless_given_a_length() -> None:
    assert Member("c", "out").span(8) == (0, 8)
    assert Member("c", "out", start=3).span(8) == (3, 8)
    assert Member("c", "out", start=2, length=3).span(8) == (2, 5)
    assert Member("c", "out", length=0).span(8) == (0, 0)


def test_member_is_frozen_and_hashable() -> None:
    m = Member("c", "in", offset=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.offset = 0  # type: ignore[misc]
    assert len({m, Member("c", "in", offset=4), Member("c", "in")}) == 2


def test_producer_and_reader_helpers_build_their_members() -> None:
    assert producer("conv") == [Member("conv", "out")]
    assert producer("conv", "bn") == [Member("conv", "out"), Member("bn", "channel")]
    assert reader("fc") == [Member("fc", "in")]
    # the reader comes before its norm, so the norm is not read as a producer's own
    assert reader("conv", 8, "bn") == [Member("conv", "in", 8), Member("bn", "channel", 8)]


# -- producers, consumers, kinds ------------------------------------------------------------
def test_producers_pair_a_conv_with_the_norm_right_after_it_at_offset_zero() -> None:
    g = ChannelGroup(
        "g",
        4,
        [
            *producer("c1", "bn1"),
            Member("c2", "out"),
            Member("cat_bn", "channel", offset=8),  # a norm at an offset: not c2's own
            *reader("r", 0, "rbn"),
            Member("c3", "out"),  # last member: no norm after it
        ],
    )
    assert g.producers == [Producer("c1", "bn1"), Producer("c2"), Producer("c3")]
    assert g.consumers == [
        Consumer("cat_bn", 8, "norm"),
        Consumer("r", 0, "input"),
        Consumer("rbn", 0, "norm"),
    ]
    assert [m.module for m in g.of_kind("out")] == ["c1", "c2", "c3"]
    assert [m.module for m in g.of_kind("channel", "in")] == ["bn1", "cat_bn", "r", "rbn"]
    assert g.of_kind() == []


def test_a_norm_after_a_reader_is_not_paired_with_a_producer() -> None:
    g = ChannelGroup("g", 4, [Member("r", "in"), Member("bn", "channel"), Member("c", "out")])
    assert g.producers == [Producer("c", None)]
    assert g.consumers == [Consumer("r", 0, "input"), Consumer("bn", 0, "norm")]


# -- segments ---------------------------------------------------------------------------------
def test_segments_are_cut_at_every_members_span() -> None:
    assert ChannelGroup("g", 5).segments() == [(0, 5)]  # no members: one segment
    assert ChannelGroup("g", 5, producer("c", "bn")).segments() == [(0, 5)]
    g = _concat_group()
    assert g.segments() == [(0, 4), (4, 6)]
    assert segment_of(g) == [0, 0, 0, 0, 1, 1]
    # readers cut too: a split read by two convs (0-1 and 2-5), written by one
    split = ChannelGroup(
        "split",
        6,
        [Member("c", "out"), Member("r1", "in", length=2), Member("r2", "in", start=2)],
    )
    assert split.segments() == [(0, 2), (2, 6)]
    # overlapping spans: every boundary is a cut
    overlap = ChannelGroup(
        "o", 8, [Member("a", "out", length=5), Member("b", "out", start=3), Member("r", "in")]
    )
    assert overlap.segments() == [(0, 3), (3, 5), (5, 8)]
    assert segment_of(overlap) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_segments_ignore_spans_past_the_width() -> None:
    g = ChannelGroup("g", 4, [Member("a", "out", start=2, length=5), Member("r", "in")])
    assert g.segments() == [(0, 2), (2, 4)]  # the cut at 7 lies outside the group


# -- prunable and select_groups ---------------------------------------------------------------
def _named(*names: str, excluded: dict[str, str] | None = None) -> list[ChannelGroup]:
    excluded = excluded or {}
    return [ChannelGroup(n, 4, producer(n), excluded=excluded.get(n)) for n in names]


def test_prunable_drops_excluded_groups_in_order() -> None:
    groups = _named("a", "b", "c", excluded={"b": "grouped conv"})
    assert [g.name for g in prunable(groups)] == ["a", "c"]


def test_select_groups_matches_include_globs_minus_exclude_globs() -> None:
    groups = _named("layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc", excluded={})
    pick = lambda inc, exc=(): [g.name for g in select_groups(groups, inc, exc)]  # noqa: E731
    assert pick(["*"]) == ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]
    assert pick(["layer1.*"]) == ["layer1.0.conv1", "layer1.0.conv2"]
    assert pick(["*"], ["*.conv2", "fc"]) == ["layer1.0.conv1", "layer2.0.conv1"]
    assert pick(["fc", "layer2.*"]) == ["layer2.0.conv1", "fc"]  # the groups' order, not the globs'
    with pytest.raises(CsgdError):
        pick(["LAYER1.*"])  # case-sensitive: matches nothing


def test_select_groups_never_chooses_an_excluded_group() -> None:
    groups = _named("a", "b", excluded={"b": "GroupNorm 'b' has no per-channel merge rule"})
    assert [g.name for g in select_groups(groups, ["*"])] == ["a"]
    assert [g.name for g in select_groups(groups, ["a", "b"])] == ["a"]


def test_a_group_that_yields_is_left_out_only_when_its_partner_is_chosen() -> None:
    heads = ChannelGroup("attn", 4, yields_to="attn.qkv")
    chans = ChannelGroup("attn.qkv", 32)
    groups = [heads, chans]
    assert [g.name for g in select_groups(groups, ["*"])] == ["attn.qkv"]
    assert [g.name for g in select_groups(groups, ["*"], ["attn.qkv"])] == ["attn"]
    assert [g.name for g in select_groups(groups, ["attn"])] == ["attn"]


def test_select_groups_explains_a_model_with_no_prunable_group() -> None:
    groups = _named("a", "b", excluded={"a": "grouped conv 'a'", "b": "PReLU 'b'"})
    with pytest.raises(CsgdError) as e:
        select_groups(groups, ["*"])
    msg = str(e.value)
    assert "no prunable channel group (2 found, all excluded; the first: grouped conv 'a')" in msg
    assert "`csgd groups`" in msg and "\n" not in msg


def test_select_groups_names_groups_when_the_include_matches_nothing() -> None:
    groups = _named(*(f"g{i}" for i in range(8)), excluded={"g0": "why"})
    with pytest.raises(CsgdError) as e:
        select_groups(groups, ["conv*"])
    msg = str(e.value)
    assert "prune.include=['conv*'] matches no prunable channel group" in msg
    # the first six prunable names as examples (g0 is excluded, g7 is the seventh)
    assert "g1, g2, g3, g4, g5, g6, ..." in msg and "g0" not in msg and "g7" not in msg
    with pytest.raises(CsgdError, match="matches no prunable"):
        select_groups(groups, ["*"], ["*"])  # everything excluded by the user


# -- canonical and cluster_labels -------------------------------------------------------------
def test_canonical_sorts_members_and_orders_clusters_by_their_first() -> None:
    assert canonical([[5, 3], [4, 0, 2], [1]]) == [[0, 2, 4], [1], [3, 5]]
    assert canonical([]) == []


def test_cluster_labels_give_each_channel_its_cluster_index() -> None:
    assert cluster_labels([[0, 3], [1], [2, 4]], 5) == [0, 1, 2, 0, 2]
    assert cluster_labels([[0, 1, 2]], 3) == [0, 0, 0]


# -- check_clusters ---------------------------------------------------------------------------
def test_check_clusters_accepts_a_partition_inside_segments() -> None:
    g = _concat_group()
    check_clusters([g], {"cat": [[0, 3], [1, 2], [4, 5]]})
    check_clusters([g], {"cat": [[i] for i in range(6)]})
    check_clusters([g], {})  # nothing to prune: nothing to refuse


@pytest.mark.parametrize(
    "clusters",
    [
        [[0, 1]],  # not a dict
        {"cat": [0, 1, 2]},  # not a list of lists
        {"cat": ([0, 1],)},  # a tuple of clusters
        {"cat": [[0, 1.0]]},  # a float index
        {"cat": [["0"]]},  # a string index
        None,
    ],
    ids=["list", "flat", "tuple", "float", "str", "none"],
)
def test_check_clusters_refuses_malformed_clusters(clusters: object) -> None:
    _one_error("its clusters are malformed", [_concat_group()], clusters)


def test_check_clusters_refuses_an_unknown_group() -> None:
    msg = _one_error("clusters name group 'other'", [_concat_group()], {"other": [[0]]})
    assert "which this model does not have" in msg


@pytest.mark.parametrize(
    "cl",
    [
        [[0, 1], [2, 3], [4]],  # channel 5 missing
        [[0, 1], [1, 2, 3], [4, 5]],  # channel 1 twice
        [[0, 1, 2, 3], [4, 5], []],  # an empty cluster
        [[0, 1, 2, 3], [4, 5, 6]],  # a channel past the width
        [[0, 1, 2, 3], [4, -1]],  # a negative index
    ],
    ids=["missing", "twice", "empty", "past", "negative"],
)
def test_check_clusters_refuses_what_does_not_partition_the_channels(cl: list) -> None:
    msg = _one_error("do not partition its 6 channels", [_concat_group()], {"cat": cl})
    assert "group 'cat'" in msg


def test_check_clusters_refuses_a_cluster_across_segments() -> None:
    _one_error(
        "a cluster of group 'cat' spans channels written by different layers",
        [_concat_group()],
        {"cat": [[0, 1], [2], [3, 4], [5]]},
    )


def test_check_clusters_refuses_pruning_an_excluded_group_but_not_keeping_it() -> None:
    g = ChannelGroup("g", 3, producer("c"), excluded="grouped conv 'c'")
    check_clusters([g], {"g": [[0], [1], [2]]})  # full width: nothing merged
    _one_error(r"group 'g' cannot be pruned \(grouped conv 'c'\)", [g], {"g": [[0, 1], [2]]})


def test_check_clusters_refuses_both_groups_that_share_rows() -> None:
    heads = ChannelGroup("attn", 2, yields_to="attn.qkv")
    chans = ChannelGroup("attn.qkv", 4)
    groups = [heads, chans]
    thin_heads, thin_chans = [[0, 1]], [[0, 1], [2], [3]]
    check_clusters(groups, {"attn": thin_heads, "attn.qkv": [[i] for i in range(4)]})
    check_clusters(groups, {"attn": [[0], [1]], "attn.qkv": thin_chans})
    check_clusters(groups, {"attn": thin_heads})
    with pytest.raises(CsgdError) as e:
        check_clusters(groups, {"attn": thin_heads, "attn.qkv": thin_chans})
    msg = str(e.value)
    assert "groups 'attn' and 'attn.qkv' share rows" in msg
    assert "prune.exclude=['attn.qkv'] prunes 'attn'" in msg


def test_check_clusters_prefixes_where_the_clusters_came_from() -> None:
    msg = _one_error("malformed", [_concat_group()], "junk", where="ckpt=run/x.pt")
    assert msg.startswith("ckpt=run/x.pt: its clusters are malformed")
    msg = _one_error("malformed", [_concat_group()], "junk")
    assert msg.startswith("its clusters are malformed")


# -- describe ---------------------------------------------------------------------------------
def test_describe_lists_each_group_its_state_and_members_by_kind() -> None:
    groups = [
        _concat_group(),
        ChannelGroup("gn", 8, [Member("gn", "channel")], excluded="GroupNorm 'gn' mixes channels"),
        ChannelGroup("attn", 4, [Member("attn.qkv", "out", block=8)], yields_to="attn.qkv"),
        ChannelGroup("x", 2, yields_to="y", excluded="no rule"),
    ]
    assert describe(groups).splitlines() == [
        "cat  width 6  prunable",
        "    producers    a, b",
        "    per-channel  bn",
        "    readers      next",
        "gn  width 8  EXCLUDED: GroupNorm 'gn' mixes channels",
        "    per-channel  gn",
        "attn  width 4  prunable when 'attn.qkv' is excluded (they share rows)",
        "    producers    attn.qkv",
        "x  width 2  EXCLUDED: no rule",  # excluded: no yields_to clause
    ]
    assert describe([]) == ""
