"""Shared pytest fixtures: tiny model configs and models that run in milliseconds on a CPU.

``tiny_config(**overrides)`` builds a DeepSeek-V3-shaped :class:`ModelConfig` (MLA with a query
LoRA, a dense first layer then MoE layers with shared + routed experts, group-limited routing,
one MTP module) at hidden size 32 and vocab 128; ``tiny_model(**overrides)`` instantiates it
with a fixed seed and an init large enough (std 0.1) that attention and routing are far from
uniform, so equivalence tests can fail. Keep this file small: add fixtures others can share.

Torch runs single-threaded in tests (override with NANOSEEK_TEST_THREADS): the suite's tensors
are tiny, and two intra-op threads on a busy 2-core machine made each small matmul ~20x slower.
"""

from __future__ import annotations

import os

import pytest
import torch

from nanoseek.model import DeepseekV3ForCausalLM, ModelConfig

torch.set_num_threads(int(os.environ.get("NANOSEEK_TEST_THREADS", "1")))

TINY = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256,
    rope_scaling=None, initializer_range=0.1,
)


def make_tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides}).validate()


def make_tiny_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(make_tiny_config(**overrides))


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config(hidden_size=64, ...)`` -> validated ModelConfig."""
    return make_tiny_config


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(seed=0, **config_overrides)`` -> initialised fp32 model (train mode)."""
    return make_tiny_model


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Token-by-token argmax of full forwards over ``ids``, no cache (what cached decoding must equal)."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def script_engine(monkeypatch, scripts: dict[int, list[int]], eos_id: int, then_free: bool = False) -> None:
    """Make a tiny random model write chosen tokens: ``Engine._ban`` (the one place every decoding path
    passes its logits through before choosing) gets a large bias on sample i's scripted next token,
    ``scripts[len(prompt)][k]`` with k its own model-written tokens so far (tool outputs skipped);
    after the script, EOS (or the real model when ``then_free``). An MTP verify step's two positions
    get the script's next two tokens. Patches stack within a test: a second script must use other
    prompt lengths."""
    from nanoseek.infer.engine import Engine

    original = Engine._ban

    def ban(self, logits, samples):
        logits = original(self, logits, samples).clone()
        for i, s in enumerate(samples):
            script = scripts.get(len(s.req.prompt))
            if script is None:
                continue
            k = sum(s.model_mask)
            for j in range(logits.shape[1] if logits.dim() == 3 else 1):
                if k + j >= len(script) and then_free:
                    continue
                nxt = script[k + j] if k + j < len(script) else eos_id
                if logits.dim() == 3:
                    logits[i, j, nxt] += 1e4
                else:
                    logits[i, nxt] += 1e4
        return logits

    monkeypatch.setattr(Engine, "_ban", ban)


def _topk_ties_by_position(x, k, dim=-1, largest=True, sorted=True):
    values, index = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), index.narrow(dim, 0, k)))


@pytest.fixture
def ties_by_position(monkeypatch):
    """Every ``torch.topk`` (transformers' indexer selections included) keeps equal values in
    position order, earliest first, the rule nanoseek's sparse-attention selection uses
    (``nanoseek.model.dsa.top_k_visible``): with it, transformers' V3.2/V4 and nanoseek must agree
    even where an indexer's k-th score is tied (without it they agree only where none is)."""
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, k, dim=-1, largest=True, sorted=True:
                        _topk_ties_by_position(self, k, dim, largest, sorted))
    monkeypatch.setattr(torch, "topk", _topk_ties_by_position)


# The heaviest multi-process and long-run cases, marked `slow` here (by node id) so `make test` stays
# under 10 minutes on 2 cores; each class keeps a faster sibling in the default suite (named after
# the arrow), and CI runs these with `make test-slow` (.ci/run names their files).
HEAVY = {
    "tests/test_adversarial_spike.py::test_killed_and_resumed_run_through_a_trend_alarm_decides_the_same",
    # -> test_divergence_is_one_line_with_a_resume_command_that_works
    "tests/test_adversarial_spike.py::test_long_ordinary_document_never_rolls_back_and_the_run_completes[code]",  # -> [prose]
    "tests/test_adversarial_spike.py::test_long_garbage_document_is_skipped_and_the_run_completes[repeated]",  # -> [random]
    "tests/test_adversarial_spike.py::test_shipped_tiny_recipe_on_the_clean_corpus_through_the_cli",
    # -> test_clean_small_corpus_guard_on_no_skip_no_rollback
    "tests/test_adversarial_spike.py::test_slow_drift_of_the_weights_by_a_growing_lr_still_rolls_back",
    "tests/test_pipeline.py::test_pp2_dp2_matches_one_process[dualpipev]",  # -> [1f1b]
    "tests/test_pipeline.py::test_micro_batch_counts_torch_accepts_train_like_one_process[zbv-1]",  # -> [gpipe-1]
    "tests/test_pipeline.py::test_micro_batch_counts_torch_accepts_train_like_one_process[zbv-3]",
    "tests/test_pipeline.py::test_micro_batch_counts_torch_accepts_train_like_one_process[interleaved-1f1b-3]",
    "tests/test_distributed.py::test_four_ranks_two_expert_replicas_match_one[ep2]",
    # -> tests/test_expert_replicas.py::test_redundant_experts_match_one_device[2]
    "tests/test_expert_replicas.py::test_redundant_experts_match_one_device[4]",  # -> [2]
    "tests/test_distributed.py::test_grpo_rollouts_sharded_over_ranks_match_one_process[dapo]",  # -> [grpo]
    "tests/test_distributed.py::test_grpo_rollouts_sharded_over_ranks_match_one_process[dr_grpo]",
    "tests/test_ablate.py::test_parallel_jobs_train_exactly_the_runs_of_a_sequential_suite",
    # -> test_parallel_jobs_stop_on_an_interrupted_or_failed_run_and_resume_the_rest, test_jobs_flag_needs_steps
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in HEAVY:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test: tiny matmuls run faster than with two threads on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo():
    """Each test module starts with dynamo's caches empty. Dynamo counts graphs per code object
    across the whole process, so the compiled tiny models of earlier modules would count towards
    the recompile limit, past which a compiled step falls back to eager (nanoseek/train/compiled.py)."""
    import sys

    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
    yield
