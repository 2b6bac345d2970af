"""SFT: the loss covers assistant tokens only; packing keeps conversations whole; training lowers the loss."""

import torch

from nanoseek.post.common import IGNORE, IndexStream, chat_row
from nanoseek.post.sft import SFTTask, load_sft_examples, pack_rows, tokenize_examples
from nanoseek.post.datasets import SFTExample
from post_helpers import tiny_model, tiny_tokenizer

CHAT = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning": "r"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]


def test_sft_mask_covers_assistant_tokens_only():
    tk = tiny_tokenizer()
    ids, labels, cut = chat_row(tk, CHAT)
    assert not cut and len(ids) == len(labels) and labels[-1] == IGNORE
    targets = [t for t in labels if t != IGNORE]
    # exactly the assistant-written text is a target: reasoning block + answer + EOS, for both turns
    expected = (tk.encode("<think>\nr\n</think>\n\na1") + [tk.eos_id] + tk.encode("a2") + [tk.eos_id])
    assert targets == expected
    # and each label is the next token of the input
    for t, lab in enumerate(labels):
        if lab != IGNORE:
            assert lab == ids[t + 1]
    # nothing of the user / system turns or the role headers is ever a target
    pos = {t + 1 for t, lab in enumerate(labels) if lab != IGNORE}
    for t, tok in enumerate(ids):
        if tok in (tk.token_to_id("<｜User｜>"), tk.token_to_id("<｜Assistant｜>"), tk.bos_id):
            assert t not in pos
    text_of_targets = tk.decode(targets)
    assert "q1" not in text_of_targets and "sys" not in text_of_targets


def test_truncation_is_counted():
    tk = tiny_tokenizer()
    ids, labels, cut = chat_row(tk, CHAT, max_len=8)
    assert cut and len(ids) == 8 and len(labels) == 8


def test_packing_keeps_examples_whole_and_labels_aligned():
    tk = tiny_tokenizer()
    examples = load_sft_examples("tasks:digit7,arithmetic", 12, seed=1)
    rows = tokenize_examples(tk, examples, 128)
    bins = pack_rows(rows, 128, seed=0)
    assert sorted(i for b in bins for i in b) == list(range(12))        # every example exactly once
    assert all(sum(len(rows.ids[i]) for i in b) <= 128 for b in bins)
    assert len(bins) < 12                                                 # packing actually packs
    task = SFTTask(rows, tk.pad_id, micro_batch_size=2, max_seq_len=128, mode="pack")
    batch = task.make_batch([0, 1])
    ids, labels = batch["input_ids"], batch["labels"]
    valid = labels != IGNORE
    assert torch.equal(labels[:, :-1][valid[:, :-1]], ids[:, 1:][valid[:, :-1]])
    assert int(valid.sum()) == sum(sum(x != IGNORE for x in rows.labels[i]) for u in (0, 1) for i in task.units[u])
    pad = SFTTask(rows, tk.pad_id, micro_batch_size=3, max_seq_len=128, mode="pad")
    assert pad.make_batch([0, 1, 2])["input_ids"].shape[0] == 3


def test_cold_start_examples_render_reasoning():
    ex = load_sft_examples("tasks:arithmetic", 2, seed=0)
    a = ex[0].messages[1]
    assert a["role"] == "assistant" and a["reasoning"] and a["content"].startswith("Answer: ")
    zero = load_sft_examples("tasks:arithmetic", 1, seed=0, template="r1-zero")[0]
    assert "<think> </think>" in zero.messages[0]["content"] and zero.messages[1]["content"].startswith("<answer>")


def test_index_stream_resumes_exactly():
    s = IndexStream(5, 3, seed=4)
    s.next_indices()
    state = s.state_dict()
    expected = [s.next_indices() for _ in range(4)]
    t = IndexStream(5, 3, seed=4)
    t.load_state_dict(state)
    assert [t.next_indices() for _ in range(4)] == expected
    # every epoch is a permutation: the first 5 indices drawn after the start cover all examples
    assert sorted(IndexStream(5, 5, seed=4).next_indices()) == [0, 1, 2, 3, 4]


def test_sft_task_loss_goes_down():
    tk = tiny_tokenizer()
    rows = tokenize_examples(tk, [SFTExample(messages=[{"role": "user", "content": "x"},
                                                        {"role": "assistant", "content": "7"}])] * 4, 64)
    task = SFTTask(rows, tk.pad_id, micro_batch_size=4, max_seq_len=64, mode="pad")
    model = tiny_model(tk.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = task.batches()
    losses = []
    for _ in range(15):
        loss, m = task.loss(model, next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(m["ce"])
    assert m["tokens"] == 8                                               # "7" + EOS per example
    assert losses[-1] < 0.2 * losses[0]
