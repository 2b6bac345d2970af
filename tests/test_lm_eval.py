"""lm-evaluation-harness against ``nanoseek serve``: its numbers are the model's own.

``nanoseek serve`` (built from its command line, on a tiny random DeepSeek-V3 saved as a run
folder) answers lm-eval 0.4.13's API models over real HTTP. Two tasks are defined here as YAML in a
temporary folder (lm-eval's ``include_path``) over local JSON files:

* a multiple-choice task (loglikelihood requests: token ids, ``echo``, ``logprobs: 1``,
  ``max_tokens: 1``, several prompts per request) through ``local-completions`` with the tokenizer
  found from the server (vLLM's ``/tokenize`` endpoints) and with the checkpoint's own HF tokenizer:
  every loglikelihood lm-eval logs equals the sum of the continuation's logprobs from a direct
  ``model(ids)`` (the same tokenization lm-eval does) to 1e-4, ``is_greedy`` equals the model's
  argmax, and ``acc`` follows from them;
* the same task with ``tokenized_requests=False`` (lm-eval sends text; ``add_bos_token=True``
  because the tokenizer adds BOS): the loglikelihoods are the model's own after BOS, to 1e-4;
* a perplexity task (``loglikelihood_rolling``) with a document longer than the server's context:
  with ``max_length`` = the context (token requests) or one less (string requests) every window
  fits, and the values are the model's own, window by window;
* a generation task (``generate_until``) through ``local-completions`` and, chat-templated,
  ``local-chat-completions``: each answer equals a direct greedy decode of the model.
"""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek.cli import build_parser
from nanoseek.serve.cli import build_server
from nanoseek.tasks.reply import split_reasoning
from serve_helpers import background_server, make_test_tokenizer, make_tiny_run

lm_eval = pytest.importorskip("lm_eval")

MODEL = "tiny-run"
MC_DOCS = [
    {"question": "2 + 2", "choices": ["4", "5", "22"], "answer": 0},
    {"question": "The quick brown", "choices": ["fox", "dog jumps", "cat?"], "answer": 0},
    {"question": "How are you", "choices": ["today", "fine, thank you", "I am"], "answer": 1},
    {"question": "Hello", "choices": ["world!", " world", "there"], "answer": 1},
]
GEN_DOCS = [{"question": "Hello world", "answer": "x"}, {"question": "1 + 2 =", "answer": "3"},
            {"question": "The lazy dog", "answer": "y"}]
MAX_GEN = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, model, tokenizer, checkpoint folder) of ``nanoseek serve`` on a tiny random model."""
    tokenizer = make_test_tokenizer()
    # seed 22: a random model whose greedy continuation of the MC questions starts with a space token
    # (test_a_greedy_continuation_is_reported_greedy needs one; seed 0 has none with this vocabulary)
    run = make_tiny_run(tmp_path_factory.mktemp("runs") / MODEL, tokenizer, seed=22)
    args = build_parser().parse_args(["serve", "--model", str(run), "--port", "0", "--max-batch-size", "8"])
    app, engine = build_server(args)
    with torch.no_grad():
        engine.model.lm_head.weight.mul_(4)        # spread the random logits: argmaxes are not near-ties
    with background_server(app) as url:
        yield url, engine.model, tokenizer, run / "final"
    engine.shutdown()


def write_task(folder, name: str, docs: list[dict], kind: str) -> None:
    """A lm-eval task ``name`` over ``docs`` (a local JSON file): ``kind`` "mc", "gen" or "rolling"
    (perplexity: loglikelihood_rolling over each doc's ``text``)."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    head = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / f'{name}.jsonl'}
  cache_dir: {folder / 'hf-cache'}
test_split: test
"""
    body = {"mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""", "gen": f"""output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""", "rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""}[kind]
    (folder / f"{name}.yaml").write_text(head + body)


def task_manager_for(folder):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    write_task(d, "nanoseek_mc", MC_DOCS, "mc")
    write_task(d, "nanoseek_gen", GEN_DOCS, "gen")
    return task_manager_for(d)


def logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` (trailing spaces move to the continuation; no BOS)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def greedy_text(model, tok, ids: list[int]) -> str:
    """A direct greedy decode of ``MAX_GEN`` tokens (EOS stops), cut at the task's stop string."""
    ids, out = list(ids), []
    for _ in range(MAX_GEN):
        t = int(logprobs(model, ids)[-1].argmax())
        out.append(t)
        ids.append(t)
        if t == tok.eos_id:
            out.pop()
            break
    return tok.decode(out, skip_special_tokens=True).split("\n")[0]    # the server's text skips control tokens


def evaluate(model: str, model_args: dict, task: str, task_manager, **kw) -> list[dict]:
    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=task_manager,
                                  log_samples=True, **kw)
    return res["samples"][task]


@pytest.mark.parametrize("backend", ["remote", "huggingface"])
def test_multiple_choice_loglikelihoods_are_the_models_own(served, task_manager, backend):
    url, model, tok, checkpoint = served
    args = {"model": MODEL, "base_url": url + "/v1/completions", "num_concurrent": 1, "max_retries": 1,
            "batch_size": 4, "tokenizer_backend": backend}
    if backend == "huggingface":
        args["tokenizer"] = str(checkpoint)             # the checkpoint's own tokenizer.json, through transformers
    samples = evaluate("local-completions", args, "nanoseek_mc", task_manager)
    assert len(samples) == len(MC_DOCS)
    checked = 0
    for s in samples:
        lls = []
        for (context, continuation), ((ll, is_greedy),) in zip(s["arguments"], s["resps"]):
            ctx, cont = encode_pair(tok, context, continuation)
            ids = ctx + cont
            ref = logprobs(model, ids)
            want = sum(ref[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))
            assert ll == pytest.approx(want, abs=1e-4), (context, continuation)
            assert is_greedy == all(int(ref[t - 1].argmax()) == ids[t] for t in range(len(ctx), len(ids)))
            lls.append(want)
            checked += 1
        assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == s["doc"]["answer"])
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)


def test_a_greedy_continuation_is_reported_greedy(served, tmp_path):
    """A choice that IS the model's greedy continuation comes back is_greedy=True (the other not)."""
    url, model, tok, _ = served
    found = None
    for question in ("Hello", "How are", "The quick brown fox", "2 + 2", "I am"):
        context = f"Question: {question}\nAnswer:"
        ctx = tok.encode(context)
        greedy = []
        for _ in range(3):
            greedy.append(int(logprobs(model, ctx + greedy)[-1].argmax()))
            text = tok.decode(greedy)
            # lm-eval sends context + " " + choice: usable when that re-tokenizes to exactly these ids
            if text.startswith(" ") and text[1:].strip() and encode_pair(tok, context, text) == (ctx, greedy):
                found = (question, text[1:], ctx + greedy)
                break
        if found:
            break
    assert found, "no greedy continuation that survives re-tokenization (change the questions)"
    question, choice, ids = found
    write_task(tmp_path, "nanoseek_greedy", [{"question": question, "choices": [choice, "zz"], "answer": 0}], "mc")
    samples = evaluate("local-completions", {"model": MODEL, "base_url": url + "/v1/completions", "max_retries": 1,
                                             "tokenizer_backend": "remote"}, "nanoseek_greedy", task_manager_for(tmp_path))
    ((ll, is_greedy),), ((_, other_greedy),) = samples[0]["resps"]
    ref = logprobs(model, ids)
    n = len(ids) - len(tok.encode(f"Question: {question}\nAnswer:"))
    assert ll == pytest.approx(sum(ref[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids))), abs=1e-4)
    assert is_greedy is True and other_greedy is False


@pytest.mark.parametrize("api", ["local-completions", "local-chat-completions"])
def test_generation_task_answers_are_greedy_decodes(served, task_manager, api):
    url, model, tok, _ = served
    if api == "local-completions":
        args = {"model": MODEL, "base_url": url + "/v1/completions", "max_retries": 1, "tokenizer_backend": "remote"}
        samples = evaluate(api, args, "nanoseek_gen", task_manager)
    else:
        args = {"model": MODEL, "base_url": url + "/v1/chat/completions", "max_retries": 1}
        samples = evaluate(api, args, "nanoseek_gen", task_manager, apply_chat_template=True)
    assert len(samples) == len(GEN_DOCS)
    for s in samples:
        context = s["arguments"][0][0]
        context = context if isinstance(context, str) else context[0]    # chat: lm-eval's JsonChatStr(prompt)
        if api == "local-completions":
            want = greedy_text(model, tok, tok.encode(context))
        else:   # thinking off by default: the prompt opens no think block; the answer is the content
            messages = json.loads(context) if context.startswith("[") else [{"role": "user", "content": context}]
            prompt = tok.encode_chat(messages, add_generation_prompt=True, thinking=False)[0]
            want = split_reasoning(greedy_text(model, tok, prompt))[1]
        assert s["resps"][0][0] == want, (api, context)
    assert any(s["resps"][0][0] for s in samples)        # not only empty answers (EOS first) compared



def test_string_requests_loglikelihoods_are_the_models_own(served, task_manager):
    """``tokenized_requests=False`` with ``add_bos_token=True`` (the tokenizer adds BOS): lm-eval
    counts the context with BOS and sends the text with it; the server adds no second one."""
    url, model, tok, checkpoint = served
    args = {"model": MODEL, "base_url": url + "/v1/completions", "num_concurrent": 1, "max_retries": 1,
            "batch_size": 4, "tokenizer_backend": "huggingface", "tokenizer": str(checkpoint),
            "tokenized_requests": False, "add_bos_token": True}
    samples = evaluate("local-completions", args, "nanoseek_mc", task_manager)
    checked = 0
    for s in samples:
        for (context, continuation), ((ll, is_greedy),) in zip(s["arguments"], s["resps"]):
            ctx, cont = encode_pair(tok, context, continuation)
            ids = [tok.bos_id] + ctx + cont
            ref = logprobs(model, ids)
            want = sum(ref[t - 1, ids[t]].item() for t in range(len(ctx) + 1, len(ids)))
            assert ll == pytest.approx(want, abs=1e-4), (context, continuation)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)


ROLLING_DOCS = [{"text": "Hello world, how are you today?"}, {"text": "The quick brown fox jumps over the lazy dog."},
                {"text": " ".join(f"word{i} is {i * 7 % 13}" for i in range(60))}]     # longer than one window


def rolling_reference(model, tok, text: str, max_length: int) -> float:
    """The model's log-likelihood of ``text`` after BOS, scored window by window as lm-eval splits a
    document longer than its ``max_length`` (each window's tokens predicted once)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total = 0.0
    for context, pred in map(make_disjoint_window, get_rolling_token_windows(
            tok.encode(text), prefix_token=tok.bos_id, max_seq_len=max_length - 2, context_len=1)):
        ids = context + pred
        ref = logprobs(model, ids)
        total += sum(ref[t - 1, ids[t]].item() for t in range(len(context), len(ids)))
    return total


@pytest.mark.parametrize("tokenized", [True, False])
def test_rolling_loglikelihoods_are_the_models_own(served, tmp_path, tokenized):
    """Perplexity tasks (``loglikelihood_rolling``): with ``max_length`` = the server's context (token
    requests) or one less (string requests: windows after the first get the server's BOS) every
    window fits; token requests are exact for every window, string requests for a document that
    fits in one (a later window is scored after the server's BOS, not after lm-eval's context alone)."""
    url, model, tok, checkpoint = served
    context = 256                                      # make_tiny_run's max_position_embeddings
    write_task(tmp_path, "nanoseek_ppl", ROLLING_DOCS, "rolling")
    args = {"model": MODEL, "base_url": url + "/v1/completions", "max_retries": 1, "batch_size": 1,
            # string windows after the first get the server's BOS on top of lm-eval's max_length - 1 tokens
            "max_length": context if tokenized else context - 1,
            "tokenizer_backend": "huggingface", "tokenizer": str(checkpoint),
            "tokenized_requests": tokenized}
    samples = evaluate("local-completions", args, "nanoseek_ppl", task_manager_for(tmp_path))
    assert len(samples) == len(ROLLING_DOCS)
    assert len(tok.encode(ROLLING_DOCS[-1]["text"])) > context       # the long one really takes several windows
    for s in samples:
        text = s["doc"]["text"]
        ids = tok.encode(text)
        got = s["resps"][0][0]
        if not tokenized and len(ids) > context - 3:     # scored with a BOS before each later window: close only
            assert got == pytest.approx(rolling_reference(model, tok, text, context - 1), rel=0.05)
            continue
        assert got == pytest.approx(rolling_reference(model, tok, text, args["max_length"]),
                                    abs=1e-3 if len(ids) > 100 else 1e-4)
        if len(ids) <= args["max_length"] - 2:                    # one window: log p(text | BOS), computed directly
            full = [tok.bos_id] + ids
            ref = logprobs(model, full)
            assert got == pytest.approx(sum(ref[t - 1, full[t]].item() for t in range(1, len(full))), abs=1e-4)
