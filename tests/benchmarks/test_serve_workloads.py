"""The serving benchmark's workload generators and statistics (pure functions)."""

from __future__ import annotations

import pytest
from serve_workloads import (
    TOKEN_HIGH,
    TOKEN_LOW,
    chat_plan,
    docs_that_fit,
    long_doc_plan,
    percentile,
    seed_prompts,
    summarize,
)


def test_seed_prompts_are_reproducible_distinct_and_in_the_ordinary_vocabulary() -> None:
    prompts = seed_prompts(0, 3, 500)
    assert prompts == seed_prompts(0, 3, 500)
    assert prompts != seed_prompts(1, 3, 500)
    assert [len(p) for p in prompts] == [500, 500, 500]
    assert len({tuple(p[:16]) for p in prompts}) == 3  # no prompt is another's prefix
    assert all(TOKEN_LOW <= t < TOKEN_HIGH for p in prompts for t in p)


def test_long_doc_plan_warms_each_document_once_then_queries_them_shuffled() -> None:
    plan = long_doc_plan(seed=0, num_docs=5, doc_tokens=64, repeat=3)
    assert len(plan.documents) == 5 and all(len(d) == 64 for d in plan.documents)
    assert len({tuple(d) for d in plan.documents}) == 5
    assert plan.warmup_order == [0, 1, 2, 3, 4]
    assert sorted(plan.query_order) == sorted(list(range(5)) * 3)
    assert plan.query_order != list(range(5)) * 3  # shuffled, not tiled
    assert plan == long_doc_plan(seed=0, num_docs=5, doc_tokens=64, repeat=3)
    assert (
        plan.query_order != long_doc_plan(seed=1, num_docs=5, doc_tokens=64, repeat=3).query_order
    )
    with pytest.raises(ValueError, match="repeat >= 1"):
        long_doc_plan(seed=0, num_docs=5, doc_tokens=64, repeat=0)


def test_docs_that_fit_the_cpu_pool() -> None:
    # The seed's 5 GB pool holds 40960 Llama-8B tokens: two 16k documents (not three) at 85%.
    assert docs_that_fit(40960, 16000) == 2
    assert docs_that_fit(40960, 10000) == 3
    assert docs_that_fit(40960, 10000, fill=1.0) == 4
    assert docs_that_fit(1000, 16000) == 1
    with pytest.raises(ValueError, match="fill"):
        docs_that_fit(40960, 16000, fill=0)


def test_chat_plan_shares_the_system_prompt_grows_history_and_keeps_the_rate() -> None:
    plan = chat_plan(
        seed=0,
        users=4,
        rounds=3,
        system_tokens=50,
        user_tokens=20,
        question_tokens=5,
        answer_tokens=7,
        qps=2.0,
    )
    assert plan.users == 4 and plan.rounds == 3
    assert plan.start_s == [0.0, 0.5, 1.0, 1.5]  # users join 1/qps apart
    assert plan.gap_s == 2.0  # each asks every users/qps seconds: 4 users x 1/2 s = 2 qps in all
    firsts = [plan.first_prompt(u) for u in range(4)]
    assert all(p[:50] == plan.system_prompt for p in firsts)
    assert len({tuple(p[50:70]) for p in firsts}) == 4  # each user's own context
    prompt = firsts[1]
    for round_ in range(1, 3):
        answer = list(range(7))
        grown = plan.next_prompt(1, round_, prompt, answer)
        assert grown[: len(prompt)] == prompt  # the history is a prefix of the next round
        assert grown[len(prompt) :] == answer + plan.questions[1][round_]
        prompt = grown
    assert len(prompt) == plan.final_tokens(1) == 50 + 20 + 3 * 5 + 2 * 7
    with pytest.raises(ValueError, match="qps > 0"):
        chat_plan(0, 1, 1, 1, 1, 1, 1, qps=0)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 90) == 5.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_summarize() -> None:
    assert summarize([3.0, 1.0, 2.0]) == {
        "n": 3,
        "mean": 2.0,
        "p50": 2.0,
        "p90": pytest.approx(2.8),
        "min": 1.0,
        "max": 3.0,
    }
    with pytest.raises(ValueError, match="no values"):
        summarize([])
