"""Speculative-decoding options (SGLang's names): effective settings, typed errors for combinations that do not
exist yet, and the NGRAM lookup."""

from __future__ import annotations

import numpy as np
import pytest

import sgl_ray
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_ray.speculative import SpeculativeConfig, ngram_drafts


def test_effective_settings():
    assert SpeculativeConfig.from_args(EngineArgs()) is None
    ngram = SpeculativeConfig.from_args(
        EngineArgs(speculative_algorithm="ngram", speculative_num_draft_tokens=6)
    )
    assert (ngram.algorithm, ngram.max_drafts, ngram.ngram_min_window, ngram.ngram_max_window) == (
        "NGRAM",
        5,
        1,
        12,
    )
    # NGRAM: trees from the n-gram cache by default (SGLang's breadths), chains with a max breadth of 1 or
    # (by default) on the flashinfer backend, which has no tree mask
    assert (ngram.is_tree, ngram.ngram_min_breadth, ngram.ngram_max_breadth, ngram.ngram_match_type) == (
        True,
        1,
        10,
        "BFS",
    )
    for chain in ({"speculative_ngram_max_bfs_breadth": 1}, {"attention_backend": "flashinfer"}):
        cfg = SpeculativeConfig.from_args(EngineArgs(speculative_algorithm="NGRAM", **chain))
        assert not cfg.is_tree and cfg.ngram_max_breadth == 1
    draft = dict(speculative_algorithm="STANDALONE", speculative_draft_model_path="/some/model")
    assert SpeculativeConfig.from_args(EngineArgs(**draft)).num_draft_tokens == 4  # 3 steps by default
    assert SpeculativeConfig.from_args(EngineArgs(**draft, speculative_num_steps=5)).max_drafts == 5
    # a chain verifies num_steps + 1 tokens, whatever num_draft_tokens says (as SGLang adjusts it)
    cfg = EngineArgs(
        **draft, speculative_num_steps=2, speculative_num_draft_tokens=9, speculative_eagle_topk=1
    )
    assert SpeculativeConfig.from_args(cfg).num_draft_tokens == 3
    eagle = SpeculativeConfig.from_args(
        EngineArgs(speculative_algorithm="eagle3", speculative_draft_model_path="/h", speculative_num_steps=4)
    )
    assert (eagle.algorithm, eagle.num_draft_tokens, eagle.uses_draft_model, eagle.is_eagle) == (
        "EAGLE3",
        5,
        True,
        True,
    )


@pytest.mark.parametrize(
    ("options", "error", "param"),
    [
        ({"speculative_algorithm": "EAGLE3"}, InvalidRequestError, "speculative_draft_model_path"),
        ({"speculative_algorithm": "MEDUSA"}, InvalidRequestError, "speculative_algorithm"),
        (
            {"speculative_algorithm": "NGRAM", "speculative_eagle_topk": 4},
            UnsupportedFeatureError,
            "speculative_eagle_topk",
        ),
        ({"speculative_algorithm": "NGRAM", "pp_size": 2}, UnsupportedFeatureError, "pp_size"),
        (
            {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 1},
            InvalidRequestError,
            "speculative_num_draft_tokens",
        ),
        (
            {"speculative_algorithm": "NGRAM", "speculative_draft_model_path": "x"},
            InvalidRequestError,
            "speculative_draft_model_path",
        ),
        (
            {
                "speculative_algorithm": "NGRAM",
                "speculative_ngram_min_match_window_size": 5,
                "speculative_ngram_max_match_window_size": 2,
            },
            InvalidRequestError,
            "speculative_ngram_min_match_window_size",
        ),
        (
            {"speculative_algorithm": "NGRAM", "speculative_ngram_max_bfs_breadth": 0},
            InvalidRequestError,
            "speculative_ngram_min_bfs_breadth",
        ),
        (
            {"speculative_algorithm": "NGRAM", "speculative_ngram_match_type": "DFS"},
            InvalidRequestError,
            "speculative_ngram_match_type",
        ),
        (
            {"speculative_algorithm": "NGRAM", "speculative_ngram_branch_length": 12},
            InvalidRequestError,
            "speculative_ngram_branch_length",
        ),
        (
            {"speculative_algorithm": "NGRAM", "speculative_ngram_capacity": 5},
            InvalidRequestError,
            "speculative_ngram_capacity",
        ),
        (
            {
                "speculative_algorithm": "NGRAM",
                "attention_backend": "flashinfer",
                "speculative_ngram_max_bfs_breadth": 4,
            },
            UnsupportedFeatureError,
            "speculative_ngram_max_bfs_breadth",
        ),
        ({"speculative_algorithm": "STANDALONE"}, InvalidRequestError, "speculative_draft_model_path"),
        (
            {
                "speculative_algorithm": "STANDALONE",
                "speculative_draft_model_path": "x",
                "speculative_num_steps": 0,
            },
            InvalidRequestError,
            "speculative_num_steps",
        ),
    ],
)
def test_unsupported_or_bad_options_are_typed_errors(options, error, param):
    with pytest.raises(error) as info:
        EngineArgs(**options)
    assert info.value.param == param


def test_draft_model_with_another_vocabulary_fails_at_start(tiny_llama_path, small_vocab_pair):
    with pytest.raises(InvalidRequestError, match="vocabulary") as info:
        sgl_ray.Engine(
            tiny_llama_path,
            max_total_tokens=1024,
            speculative_algorithm="STANDALONE",
            speculative_draft_model_path=small_vocab_pair[0],
        )
    assert info.value.param == "speculative_draft_model_path"


def test_ngram_lookup():
    t = np.array
    assert ngram_drafts(t([5, 6, 7, 8, 9, 5, 6]), k=3) == [7, 8, 9]
    assert ngram_drafts(t([5, 6, 7, 8, 9, 5, 6]), k=2) == [7, 8]
    assert ngram_drafts(t([1, 2, 3]), k=3) == []  # the last token never occurred before
    # the longest match wins over a more recent shorter one: "1 2" was followed by 3, "2" (alone) later by 7
    assert ngram_drafts(t([1, 2, 3, 4, 2, 7, 1, 2]), k=2) == [3, 4]
    # equally long matches: the most recent
    assert ngram_drafts(t([4, 1, 4, 2, 4]), k=1) == [2]
    # min window: a one-token match is not enough
    assert ngram_drafts(t([3, 9, 8, 3]), k=2, min_window=2) == []
    assert ngram_drafts(t([3, 9, 8, 3]), k=2, min_window=1) == [9, 8]
    # a repeating pattern continues past the end of the tokens
    assert ngram_drafts(t([7, 1, 2, 1, 2]), k=5) == [1, 2, 1, 2, 1]
    assert ngram_drafts(t([0, 0, 0]), k=4) == [0, 0, 0, 0]
    # max window caps the match length (then the most recent of the capped ones)
    assert ngram_drafts(t([1, 2, 3, 5, 2, 3, 6, 1, 2, 3]), k=1, max_window=2) == [6]
