"""The serving benchmark's workloads as token-id prompts, and the statistics reported on them.

Pure functions of a seed: the same flags give every server the same prompts in the same order.
Token ids are drawn from ``[1000, 120000)``, clear of Llama-3's special tokens (128000 and up), so
no prompt ends early and a random prefix never collides with another prompt's.

* The seed's experiment: a few long prompts, each sent cold and then warm.
* LMCache's ``long_doc_qa`` shape: documents sent once each (warm-up round), then again,
  repeated and shuffled (query round), with many requests in flight.
* production-stack's ``multi-round-qa`` shape: users that share a system prompt, each with its own
  context, asking one question per round at a fixed overall rate; every round's prompt is the
  previous prompt, the model's answer and a new question (a growing history).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

TOKEN_LOW = 1000
TOKEN_HIGH = 120000


def random_tokens(rng: random.Random, n: int) -> list[int]:
    """``n`` token ids, uniform over the ordinary vocabulary."""
    return [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n)]


def seed_prompts(seed: int, count: int, tokens: int) -> list[list[int]]:
    """``count`` unrelated prompts of ``tokens`` tokens each."""
    rng = random.Random(f"seed-experiment:{seed}")
    return [random_tokens(rng, tokens) for _ in range(count)]


@dataclass(frozen=True)
class LongDocPlan:
    documents: list[list[int]]
    warmup_order: list[int]
    """Each document once, in order: every request computes and stores its KV."""
    query_order: list[int]
    """Each document ``repeat`` times, shuffled: the reuse round."""


def long_doc_plan(seed: int, num_docs: int, doc_tokens: int, repeat: int) -> LongDocPlan:
    if num_docs < 1 or doc_tokens < 1 or repeat < 1:
        raise ValueError(
            f"long_doc_qa needs documents >= 1, tokens >= 1 and repeat >= 1, got "
            f"{num_docs}, {doc_tokens}, {repeat}"
        )
    rng = random.Random(f"long-doc-qa:{seed}")
    documents = [random_tokens(rng, doc_tokens) for _ in range(num_docs)]
    query_order = list(range(num_docs)) * repeat
    rng.shuffle(query_order)
    return LongDocPlan(documents, list(range(num_docs)), query_order)


def docs_that_fit(pool_tokens: int, doc_tokens: int, fill: float = 0.85) -> int:
    """How many documents fit in ``fill`` of a CPU pool of ``pool_tokens`` tokens (at least 1)."""
    if pool_tokens < 1 or doc_tokens < 1 or not 0 < fill <= 1:
        raise ValueError(
            f"pool_tokens and doc_tokens must be >= 1 and 0 < fill <= 1, got "
            f"{pool_tokens}, {doc_tokens}, {fill}"
        )
    return max(1, math.floor(fill * pool_tokens / doc_tokens))


@dataclass(frozen=True)
class ChatPlan:
    system_prompt: list[int]
    """Shared by every user: the prefix every conversation starts with."""
    user_context: list[list[int]]
    questions: list[list[list[int]]]
    """``questions[user][round]``."""
    start_s: list[float]
    """When each user sends its first question, from the start of the run."""
    gap_s: float
    """A user's questions are at least this far apart: all users together ask ``qps`` per second."""
    answer_tokens: int

    @property
    def users(self) -> int:
        return len(self.user_context)

    @property
    def rounds(self) -> int:
        return len(self.questions[0]) if self.questions else 0

    def first_prompt(self, user: int) -> list[int]:
        return self.system_prompt + self.user_context[user] + self.questions[user][0]

    def next_prompt(
        self, user: int, round_: int, previous: list[int], answer: list[int]
    ) -> list[int]:
        """The history so far (previous prompt, the model's answer) and this round's question."""
        return previous + answer + self.questions[user][round_]

    def final_tokens(self, user: int) -> int:
        """Length of a user's last prompt, when every answer has ``answer_tokens`` tokens."""
        per_round = len(self.questions[user][0]) + self.answer_tokens
        return (
            len(self.system_prompt)
            + len(self.user_context[user])
            + self.rounds * per_round
            - self.answer_tokens
        )


def chat_plan(
    seed: int,
    users: int,
    rounds: int,
    system_tokens: int,
    user_tokens: int,
    question_tokens: int,
    answer_tokens: int,
    qps: float,
) -> ChatPlan:
    if min(users, rounds, question_tokens, answer_tokens) < 1 or qps <= 0:
        raise ValueError(
            "multi-round chat needs users, rounds, question and answer tokens >= 1 and qps > 0, "
            f"got {users}, {rounds}, {question_tokens}, {answer_tokens}, {qps}"
        )
    if system_tokens < 0 or user_tokens < 0:
        raise ValueError(f"prompt lengths must be >= 0, got {system_tokens}, {user_tokens}")
    rng = random.Random(f"multi-round-qa:{seed}")
    system = random_tokens(rng, system_tokens)
    context = [random_tokens(rng, user_tokens) for _ in range(users)]
    questions = [[random_tokens(rng, question_tokens) for _ in range(rounds)] for _ in range(users)]
    # Users join 1/qps apart; each then asks every users/qps seconds: qps requests/s in all.
    return ChatPlan(
        system, context, questions, [u / qps for u in range(users)], users / qps, answer_tokens
    )


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: list[float]) -> dict[str, float]:
    """Count, mean, median, p90, min and max of a non-empty sample."""
    if not values:
        raise ValueError("summary of no values")
    return {
        "n": len(values),
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "min": min(values),
        "max": max(values),
    }
