"""The fast tests catch the deliberate bugs of tests/mutants.py: each mutant, applied for a whole
pytest session, makes the tests that guard it fail (measured 2026-11-30 over the whole fast
suite: no_label_shift 5 failures, sample_square_swap 4, no_position_restart 15, bias_decay 6;
over tests/test_eval.py and tests/test_adaptive.py: eval_token_reduction 2, adaptive_unweighted 1)."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import clean_env, run

KILLERS = {
    "no_label_shift": ["tests/test_loss_vs_model.py"],
    "sample_square_swap": ["tests/test_loss.py", "tests/test_loss_vs_model.py"],
    "no_position_restart": ["tests/test_packed_logits.py", "tests/test_packing.py"],
    "bias_decay": ["tests/test_optim.py::test_no_norm_bias_embedding_is_ever_decayed"],
    "eval_token_reduction": ["tests/test_eval.py::test_eval_loss_per_set_and_blank_images_equal_the_models_own[sample]"],
    "adaptive_unweighted": ["tests/test_adaptive.py::"
                            "test_progress_raises_the_weight_of_the_dataset_whose_held_out_loss_falls_slower"],
    "lora_tower_leak": ["tests/test_lora.py::test_a_language_glob_never_reaches_the_vision_tower",
                        "tests/test_lora.py::test_default_targets_are_every_linear_of_the_language_tower_only"],
    "lora_unscaled_merge": ["tests/test_lora.py::test_merged_state_and_adapter_folder_match_the_wrapped_model"],
    "lora_trains_base": ["tests/test_lora.py::test_adapters_sit_where_their_layers_sit_and_only_they_train"],
}


@pytest.fixture(scope="module")
def outcomes():
    """Every mutant's pytest session over its killers, two at a time (each runs one thread on a
    2-core machine). The killers' clean pass is not rerun here: they are fast tests of this same
    suite, so a killer that fails without its mutant fails `make test` already."""
    def session(mutant):
        args = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                *KILLERS[mutant]]
        return run(args, timeout=300, env=clean_env(VLMFT_MUTANT=mutant, OMP_NUM_THREADS="1"))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(sorted(KILLERS), pool.map(session, sorted(KILLERS))))


@pytest.mark.slow
@pytest.mark.parametrize("mutant", sorted(KILLERS))
def test_the_fast_tests_kill_the_mutant(mutant, outcomes):
    p = outcomes[mutant]
    assert p.returncode == 1 and " failed" in p.stdout, p.stdout[-2000:]
