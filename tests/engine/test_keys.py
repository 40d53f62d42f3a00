from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from lmcache.keys import KeyScheme

SCHEME = KeyScheme("llama", world_size=2, rank=1, dtype_name="bfloat16", chunk_size=4)


def keys(tokens: list[int], partial: bool = True, scheme: KeyScheme = SCHEME) -> list[str]:
    return [c.key for c in scheme.chunks(tokens, include_partial=partial)]


def test_chunk_ranges_and_partial_chunk() -> None:
    chunks = SCHEME.chunks(list(range(10)), include_partial=True)
    assert [(c.start, c.end) for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert [(c.start, c.end) for c in SCHEME.chunks(list(range(10)), include_partial=False)] == [
        (0, 4),
        (4, 8),
    ]


def test_key_names_the_whole_prefix() -> None:
    a = keys([1, 2, 3, 4, 5, 6, 7, 8])
    b = keys([9, 2, 3, 4, 5, 6, 7, 8])
    assert a[0] != b[0] and a[1] != b[1], "a change in chunk 0 must change every later key"
    assert keys([1, 2, 3, 4, 5, 6, 7, 8, 9])[:2] == a, "extending a prompt keeps earlier keys"


def test_key_includes_model_shard_and_dtype() -> None:
    base = keys([1, 2, 3, 4])[0]
    for other in (
        KeyScheme("other", 2, 1, "bfloat16", 4),
        KeyScheme("llama", 1, 0, "bfloat16", 4),
        KeyScheme("llama", 2, 0, "bfloat16", 4),
        KeyScheme("llama", 2, 1, "float16", 4),
    ):
        assert keys([1, 2, 3, 4], scheme=other)[0] != base
    assert base.startswith("llama@2@1@bfloat16@")


def test_same_key_for_every_token_container() -> None:
    ref = keys([5, 6, 7, 8, 9])
    assert keys(np.array([5, 6, 7, 8, 9], dtype=np.int64)) == ref  # type: ignore[arg-type]
    assert keys(torch.tensor([5, 6, 7, 8, 9], dtype=torch.int32)) == ref  # type: ignore[arg-type]


def test_keys_are_stable_across_processes() -> None:
    """Another pod (or this one after a restart) must compute the same keys: no seeded hash."""
    code = (
        "from lmcache.keys import KeyScheme;"
        "print(KeyScheme('llama',2,1,'bfloat16',4).chunks(list(range(9)),True)[-1].key)"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {keys(list(range(9)))[-1]}


def test_chunk_size_is_part_of_the_key() -> None:
    """With chunk size 4 the 5-token prefix ends a 1-token chunk, with 8 a 5-token chunk: the
    same token hash must not name both, or one would load the other's KV."""
    small = KeyScheme("llama", 1, 0, "bfloat16", chunk_size=4).chunks(list(range(5)), True)
    large = KeyScheme("llama", 1, 0, "bfloat16", chunk_size=8).chunks(list(range(5)), True)
    assert (small[-1].num_tokens, large[-1].num_tokens) == (1, 5)
    assert small[-1].key != large[-1].key
