"""DPO: the loss against a hand-computed example; the task on a tiny model; pairs from verifier labels."""

import math

import pytest
import torch

from nanoseek.post.datasets import PreferenceExample
from nanoseek.post.dpo import DPOTask, compute_reference_logps, dpo_loss, encode_pairs, pairs_from_scored
from nanoseek.tasks.rewards import RewardResult
from post_helpers import tiny_model, tiny_tokenizer


def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: r_w = 0.5 * 1 = 0.5, r_l = 0.5 * -1 = -0.5, z = 1   -> log(1 + e^-1)
    # pair 2: r_w = 0.5 * -2 = -1, r_l = 0.5 * 1 = 0.5, z = -1.5  -> log(1 + e^1.5)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["reward_chosen"].item() == pytest.approx((0.5 - 1) / 2)
    assert m["reward_rejected"].item() == pytest.approx((-0.5 + 0.5) / 2)
    assert m["reward_margin"].item() == pytest.approx((1 - 1.5) / 2)
    assert m["reward_accuracy"].item() == 0.5
    # label smoothing eps: -(1-eps) log s(z) - eps log s(-z)
    ls, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.5, label_smoothing=0.1)
    assert ls.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)), abs=1e-6)


def test_dpo_task_starts_at_log2_and_learns_the_preference():
    tk = tiny_tokenizer()
    pairs = [PreferenceExample(prompt=[{"role": "user", "content": f"say 7 ({i})"}],
                               chosen={"role": "assistant", "content": "7"},
                               rejected={"role": "assistant", "content": "12"}) for i in range(4)]
    rows, truncated = encode_pairs(tk, pairs, 64)
    assert truncated == 0
    model = tiny_model(tk.vocab_size)
    compute_reference_logps(model, rows, tk.pad_id, micro_batch_size=3)
    assert all(r.ref_chosen < 0 and r.ref_rejected < 0 for r in rows)
    task = DPOTask(rows, tk.pad_id, micro_batch_size=4, beta=0.5)
    batches = task.batches()
    loss, m = task.loss(model, next(batches))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)         # policy == reference
    assert m["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        loss, m = task.loss(model, next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m["reward_margin"] > 1.0 and m["reward_accuracy"] == 1.0 and loss.item() < 0.4


def _r(reward, ok, correct):
    return RewardResult(reward=reward, format_ok=ok, correct=correct, answer=None)


def test_pairs_from_verifier_labels():
    prompt = [{"role": "user", "content": "q"}]
    p = pairs_from_scored(prompt, [("bad", _r(0.1, True, False)), ("good", _r(1.1, True, True)),
                                   ("unformatted-right", _r(0.0, False, True)), ("good2", _r(1.1, True, True))])
    assert p.chosen["content"] == "good" and p.rejected["content"] == "unformatted-right"
    assert pairs_from_scored(prompt, [("a", _r(1.1, True, True)), ("b", _r(1.1, True, True))]) is None
    assert pairs_from_scored(prompt, [("a", _r(0, False, False)), ("b", _r(0.1, True, False))]) is None


def test_auto_pairs_from_the_model_own_samples():
    from nanoseek.post.dpo import DPOSection, auto_pairs

    tk = tiny_tokenizer()
    model = tiny_model(tk.vocab_size)

    def parity(texts, items):   # an arbitrary verifier that splits random samples about in half
        return [_r(1.1 if sum(map(ord, t)) % 2 == 0 else 0.1, True, sum(map(ord, t)) % 2 == 0) for t in texts]

    a = DPOSection(data="auto:digit7", auto_prompts=4, auto_samples=6, auto_max_new_tokens=3).validate()
    pairs, report = auto_pairs(model, tk, a, reward_fn=parity)
    assert report["samples"] == 24 and report["pairs"] == len(pairs) >= 3
    for p in pairs:
        assert sum(map(ord, p.chosen["content"])) % 2 == 0
        assert sum(map(ord, p.rejected["content"])) % 2 == 1
        assert p.prompt[0]["role"] == "user" and p.meta["task"] == "digit7"


def test_pair_rows_score_the_final_response_only():
    tk = tiny_tokenizer()
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "earlier answer"},
              {"role": "user", "content": "b"}]
    pair = PreferenceExample(prompt=prompt, chosen={"role": "assistant", "content": "7"},
                             rejected={"role": "assistant", "content": "12", "reasoning": "r"})
    (row,), _ = encode_pairs(tk, [pair], 128)
    assert [t for t in row.chosen_labels if t != -100] == tk.encode("7") + [tk.eos_id]
    assert [t for t in row.rejected_labels if t != -100] == tk.encode("<think>\nr\n</think>\n\n12") + [tk.eos_id]
