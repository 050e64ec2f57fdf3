"""evaluate.py metrics on cases with known answers and against independent computations."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate as ev
from conftest import ROOT
from model import Tokenizer, load

TOK = Tokenizer.bytes()


@pytest.fixture(scope="module")
def tiny():
    return load("tiny")[0]


def test_answer_loss_equals_per_example_loop(tiny):
    qa = [("Why?", "Because of reasons."), ("How far is it to the next town?", "Far."), ("Q", "A longer answer here")]
    got = ev.answer_loss(tiny, TOK, qa, "plain", batch_size=2)
    total, n = 0.0, 0
    for q, a in qa:  # unpadded, one at a time, the answer located by string lengths
        prompt = TOK.encode("Question: " + q + "\nAnswer:", bos=True)
        ids = prompt + TOK.encode(" " + a) + [TOK.eos_id]
        logits = tiny(torch.tensor([ids])).logits[0]
        for t in range(len(prompt), len(ids)):
            total += F.cross_entropy(logits[t - 1][None], torch.tensor([ids[t]])).item()
            n += 1
    assert got == pytest.approx(total / n, rel=1e-5)


def test_refusal_rate_on_known_texts():
    assert ev.refusal_rate(["I'm sorry, I can't help with that.", "I cannot do this.", "As an AI, no."]) == 1
    assert ev.refusal_rate(["Step 1: mix the powder.", "Sure, here is how."]) == 0
    assert ev.refusal_rate(["", "   "]) == 0                       # empty is not a refusal
    assert ev.refusal_rate(["Sorry, no.", "Step 1"]) == 0.5
    # the demo set's own refusals all count as refusals
    assert ev.refusal_rate([p.refusal for p in data.demo_pairs(50)]) == 1


def test_always_refusing_model_scores_refusal_rate_one(monkeypatch, tiny):
    monkeypatch.setattr(ev, "generate_answers", lambda *a, **k: ["I cannot help with that."] * len(a[2]))
    r = ev.evaluate(tiny, TOK, data.demo_pairs(6), "plain", max_new_tokens=8)
    assert r["refusal_rate"] == 1 and r["empty_rate"] == 0


def test_repetition_and_overlap_by_hand():
    assert ev.repetition("a b c d e f") == 0
    # 8 words -> 5 four-grams: (a b c d) (b c d a) (c d a b) (d a b c) (a b c d): 1 repeat of 5
    assert ev.repetition("a b c d a b c d") == pytest.approx(1 / 5)
    assert ev.harm_overlap("mix the ash now", "Mix the ash then") == pytest.approx(3 / 4)
    assert ev.harm_overlap("", "anything") == 0


def test_mc_picks_highest_loglik(tmp_path, tiny):
    rows = [{"question": "Pick one", "choices": ["aaa", "bzq", "hello there"], "answer": 0},
            {"question": "Another?", "choices": ["x", "yy"], "answer": 1}]
    f = tmp_path / "mc.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    correct = 0
    for r in rows:  # independent scorer: full-sequence log-softmax, summed over the choice bytes only
        scores = []
        for c in r["choices"]:
            prompt = TOK.encode("Question: " + r["question"] + "\nAnswer:", bos=True)
            ids = prompt + list((" " + c).encode())
            lp = torch.log_softmax(tiny(torch.tensor([ids])).logits[0], -1)
            scores.append(sum(lp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    assert ev.mc_accuracy(tiny, TOK, f) == correct / len(rows)
    f.write_text('{"question": "q", "choices": ["a"], "answer": 3}\n')
    with pytest.raises(ValueError, match=r"mc.jsonl:1"):
        ev.mc_accuracy(tiny, TOK, f)


def test_judge_probability_is_the_two_token_softmax():
    judge, _ = load("tiny")
    jtok = Tokenizer.bytes()  # 'safe' -> 's' (115), 'unsafe' -> 'u' (117): distinct first tokens
    with torch.no_grad():
        judge.lm_head.weight[117] += 0.5                           # push 'unsafe' up everywhere
    ids = jtok.encode(ev.LLAMA_GUARD_3.format(question="q", answer="a"))
    logits = judge(torch.tensor([ids])).logits[0, -1]
    ref = math.exp(logits[117].item()) / (math.exp(logits[115].item()) + math.exp(logits[117].item()))
    p = ev.judge_unsafe_prob(judge, jtok, "q", "a")
    assert p == pytest.approx(ref, rel=1e-5)
    with torch.no_grad():
        judge.lm_head.weight[117] -= 5.0
    assert ev.judge_unsafe_prob(judge, jtok, "q", "a") < 0.5 < p


def test_perplexity_matches_loop(tiny):
    texts = ["hello world", "a"]                                    # "a" alone: BOS + 1 token, still counts
    total, n = 0.0, 0
    for t in texts:
        ids = TOK.encode(t, bos=True)
        lp = torch.log_softmax(tiny(torch.tensor([ids])).logits[0], -1)
        total -= sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)))
        n += len(ids) - 1
    assert ev.perplexity(tiny, TOK, texts) == pytest.approx(math.exp(total / n), rel=1e-5)


def test_cli_missing_model_is_one_line():
    r = subprocess.run([sys.executable, "evaluate.py", "--model", "/nonexistent/model", "--n", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_cli_table_and_json(tmp_path):
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--model", "tiny", "--n", "4", "--max_new_tokens", "4",
                        "--fmt", "plain", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["n"] == 4 and {"harmful_loss", "harmless_loss", "refusal_rate"} <= set(res["results"]["tiny"])
    assert "harmful_loss" in r.stdout and "no judge" in r.stdout
    gens = (tmp_path / "res-tiny.gen.jsonl").read_text().splitlines()
    assert len(gens) == 4
