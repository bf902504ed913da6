"""Drafting and the verification plan, without a model: the n-gram index, the shared pool and
its salt partition, the acceptance estimate, the step-time fit and which draft tokens pay."""

from __future__ import annotations

import pytest

from backends.llamacpp.config import LlamaCppSpeculative
from backends.llamacpp.drafting import ContextDrafter, NgramPool
from backends.llamacpp.speculation import Acceptance, Speculation, StepCost, micro_batches

pytestmark = pytest.mark.timeout(10)


def test_context_drafts_what_followed_the_tail_longest_match_first() -> None:
    d = ContextDrafter(2, 4)
    d.extend([1, 2, 3, 4, 5, 9, 9, 2, 3, 7, 8, 1, 2, 3])
    # tail (1, 2, 3) last followed by 4 (at the start); (2, 3) alone was last followed by 7
    assert d.propose(3) == ([4, 5, 9], 3)


def test_context_draft_chains_through_the_index_and_stops_at_k() -> None:
    d = ContextDrafter(2, 3)
    d.extend([5, 6, 7, 8, 5, 6])
    assert d.propose(2) == ([7, 8], 2)
    # past the end of what followed, the draft chains: 5 6 7 8 | 5 6 7 8 ...
    assert d.propose(6) == ([7, 8, 5, 6, 7, 8], 2)


def test_context_draft_says_how_long_a_match_it_copies() -> None:
    d = ContextDrafter(2, 4)
    d.extend([*range(20), 100, *range(10, 20)])
    # the 4-gram found, and the 6 tokens before it, are the same: a 10-token match
    assert d.propose(3) == ([100, 10, 11], 10)
    long = ContextDrafter(2, 4)
    long.extend([*range(50), 100, *range(50)])
    assert long.propose(1) == ([100], 32)  # measured back as far as MAX_MATCH


def test_long_matches_are_learned_in_bands() -> None:
    spec = Speculation(LlamaCppSpeculative(mode="ngram"), enabled=True)
    assert spec.source(13) is spec.source(12) is spec.source(15)
    assert spec.source(16) is not spec.source(15)
    assert spec.source(32) is not spec.source(31) and spec.source(7) is not spec.source(8)
    assert spec.source(32).p() > spec.source(2).p()


def test_context_without_a_match_drafts_nothing() -> None:
    d = ContextDrafter(2, 3)
    d.extend([1, 2, 3, 4])
    assert d.propose(4) == ([], 0)
    assert ContextDrafter(2, 3).propose(4) == ([], 0)


def test_pool_is_shared_within_a_salt_and_partitioned_across_salts() -> None:
    pool = NgramPool(3, size=1 << 12)
    pool.add("a", [10, 11, 12, 13, 14, 15])
    assert pool.propose("a", [99, 10, 11, 12], 3) == [13, 14, 15]
    assert pool.propose("b", [99, 10, 11, 12], 3) == []  # another key learns nothing
    pool.add("a", [1, 2, 3, 4, 5], start=4)  # only n-grams ending at 4 or later
    assert pool.propose("a", [2, 3, 4], 1) == [5]
    assert pool.propose("a", [1, 2, 3], 1) == []


def test_pool_resets_when_a_quarter_full() -> None:
    pool = NgramPool(1, size=64)
    pool.add("s", list(range(10)))
    assert pool.used > 0 and pool.propose("s", [8], 1) == [9]
    pool.add("s", list(range(100, 160)))  # ~35 of 64 slots: past a quarter, it starts over
    assert pool.used == 0 and pool.propose("s", [8], 1) == []


def test_acceptance_learns_and_drifts_back_to_its_prior() -> None:
    a = Acceptance(0.6)
    for _ in range(10):
        a.record(8, 0)  # every draft missed
    assert a.p() < 0.2
    for _ in range(400):
        a.record(0, 0)  # no drafts: it forgets
    assert a.p() == pytest.approx(0.6, abs=0.02)
    for _ in range(10):
        a.record(8, 8)
    assert a.p() > 0.95
    assert Acceptance().p(prior=0.9) == pytest.approx(0.9)


def test_step_cost_reads_between_the_sizes_it_saw() -> None:
    cost = StepCost()
    assert cost.seconds(4) > cost.seconds(1)  # nothing seen: a prior, growing with size
    cost.record(1, 0.030)
    cost.record(9, 0.090)
    assert cost.seconds(1) == pytest.approx(0.030)
    assert cost.seconds(5) == pytest.approx(0.060)  # between two sizes: a straight line
    assert cost.seconds(19) == pytest.approx(0.090 * 1.5)  # past them: +5% a token
    cost.record(9, 0.190)  # a running average
    assert 0.090 < cost.seconds(9) < 0.190
    for _ in range(StepCost.MAX_AGE + StepCost.PRUNE + 1):
        cost.record(1, 0.030)
    assert cost.table == {1: 0.030}  # 9 not seen for long: forgotten, to be tried again


def _speculation(**kw: object) -> Speculation:
    return Speculation(LlamaCppSpeculative.model_validate(kw), enabled=True)


def _costs(spec: Speculation, per_token: float, first: float = 1.0) -> None:
    """Step times: 30 ms for one token, then ``per_token`` of that for each more token
    (``first`` times it for the first one: on a CPU, 2 tokens cost twice 1)."""
    two = 0.030 * (1 + first * per_token)
    spec.cost = StepCost()
    spec.cost.record(1, 0.030)
    for n in range(2, 40):
        spec.cost.record(n, two + 0.030 * per_token * (n - 2))


def test_plan_drafts_on_a_memory_bound_step_and_not_on_a_compute_bound_one() -> None:
    spec = _speculation()
    _costs(spec, 0.02)  # a GPU: tokens nearly free
    assert spec.plan([(0.9, 16)], tokens=1) == [16]
    _costs(spec, 1.0)  # a compute-bound step: each token costs a step
    assert spec.plan([(0.9, 16)], tokens=1) == [0]
    # a CPU: the first draft token doubles the step, later ones add 20% each; a likely
    # copy is worth a long draft, an unlikely draft is not worth any
    _costs(spec, 0.2, first=5.0)
    assert spec.plan([(0.97, 16)], tokens=1) == [16]
    assert spec.plan([(0.5, 16)], tokens=1) == [0]
    likely, unlikely = spec.plan([(0.97, 16), (0.3, 16)], tokens=2)
    assert likely > 8 and unlikely == 0


def test_micro_batches_follow_llama_cpp_split_of_streams() -> None:
    assert micro_batches([0, 1, 2], [1, 1, 1]) == 1
    assert micro_batches([2, 0, 1], [4, 4, 4]) == 1  # equal rows go together, in id order
    assert micro_batches([0, 1, 2], [1, 6, 1]) == 2  # one token of each, then the draft
    assert micro_batches([0, 1, 2, 3], [1, 6, 1, 4]) == 3  # two drafts apart: a pass each
    assert micro_batches([0, 2], [1, 1]) == 2  # ids 0 and 2 are not consecutive
    assert micro_batches([0, 2], [5, 3]) == 2  # so each row is a pass already, drafts too


def test_plan_per_stream_counts_the_passes_its_drafts_add() -> None:
    spec = _speculation()
    # memory-bound steps: 30 ms for one token, each more token 2% of that; a pass 30 ms more
    spec.cost = StepCost()
    for n in range(1, 80):
        spec.cost.record(n, 0.030 * (1 + 0.02 * (n - 1)))
    ids = list(range(8))
    # drafts of one length on every stream: the step stays one micro-batch
    assert spec.plan([(0.8, 3)] * 8, tokens=8, seq_ids=ids) == [3] * 8
    # short unlikely guesses on two streams: a pass each is not worth them
    rows = [(0.0, 0)] * 2 + [(0.5, 2)] + [(0.0, 0)] * 2 + [(0.5, 2)] + [(0.0, 0)] * 2
    assert spec.plan(rows, tokens=8, seq_ids=ids) == [0] * 8
    assert spec.plan(rows, tokens=8) != [0] * 8  # one pool: no pass to pay
    # a long likely copy on one stream is worth its own pass
    copy = [(0.0, 0)] * 7 + [(0.98, 40)]
    taken = spec.plan(copy, tokens=8, seq_ids=ids)
    assert taken[:7] == [0] * 7 and taken[7] >= 24
    # a sequence alone in its run of ids is a micro-batch already: its draft adds no pass
    assert spec.plan([(0.6, 3), (0.6, 3)], tokens=2, seq_ids=[0, 5]) == spec.plan(
        [(0.6, 3), (0.6, 3)], tokens=2
    )


def test_plan_per_stream_on_a_cpu_drafts_every_likely_copy_alike() -> None:
    """Step times measured on this 2-core CPU (SmolLM2, 8 streams of 1,800 tokens each):
    attention over each stream's cells dominates, so 4 tokens a stream cost 2.15 steps."""
    spec = _speculation()
    spec.cost = StepCost()
    steps = {8: 188, 16: 261, 24: 370, 32: 404, 40: 585, 48: 619, 64: 881, 96: 1075, 128: 1542}
    for n, ms in steps.items():
        spec.cost.record(n, ms / 1000)
    ids = list(range(8))
    copies = spec.plan([(0.9, 40)] * 8, tokens=8, seq_ids=ids)
    assert len(set(copies)) == 1 and 2 <= copies[0] <= 8  # one length: one micro-batch
    assert spec.plan([(0.3, 40)] * 8, tokens=8, seq_ids=ids) == [0] * 8
    # one copying stream among seven without drafts: worth a pass only when very likely
    assert spec.plan([(0.95, 40)] + [(0.0, 0)] * 7, tokens=8, seq_ids=ids)[0] > 0
    assert spec.plan([(0.7, 40)] + [(0.0, 0)] * 7, tokens=8, seq_ids=ids) == [0] * 8


def test_plan_respects_the_step_cap_and_policy_always() -> None:
    spec = _speculation(max_step_draft=10)
    _costs(spec, 0.0)
    assert sum(spec.plan([(0.99, 8), (0.99, 8)], tokens=2)) == 10
    # with a stream per sequence too, whichever kind of plan wins (drafts of one length for
    # every stream, or whole drafts in passes of their own)
    for ids in (range(4), [0, 2, 4, 6]):
        taken = spec.plan([(0.99, 8)] * 4, tokens=4, seq_ids=list(ids))
        assert 0 < sum(taken) <= 10
    always = _speculation(policy="always", max_step_draft=12)
    assert always.plan([(0.0, 8), (0.5, 8)], tokens=2) == [8, 4]


def test_config_rules() -> None:
    with pytest.raises(ValueError, match="ngram_min"):
        LlamaCppSpeculative(ngram_min=5, ngram_max=3)
    with pytest.raises(ValueError, match="draft_model_path"):
        LlamaCppSpeculative(mode="draft")
