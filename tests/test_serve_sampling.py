"""The OpenAI decoding fields in the generator, without Ray: stop strings, seed, logprobs, presence / frequency
penalties, logit_bias, each request decoded by its own settings in a mixed batch (ftray/serve/sampling.py,
ftray/serve/engine.py). The HTTP side, with the real openai client, is in tests/test_serve.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from ftray.serve.sampling import Decoded, RowSampler, find_stop


@pytest.fixture(scope="module")
def engine(tiny_model):
    from ftray.serve.config import GenerationModel
    from ftray.serve.engine import LoraEngine

    return LoraEngine(GenerationModel(name="tiny", base=str(tiny_model)), device="cpu")


def _req(engine, prompt: str = "12+7=", **kw) -> dict:
    tok = engine.tokenizer
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    return {"adapter": None, "input_ids": ids, "max_tokens": 12, "temperature": 0.0, **kw}


def _text(engine, out: dict, stop=None) -> str:
    d = Decoded(engine.tokenizer, stop)
    return d.push(out["token_ids"]) + d.flush()


# ------------------------------------------------------------------------------------ penalties, logit_bias
def test_penalties_and_logit_bias_by_hand():
    # Two rows whose prompts end at column 2; row 0 has generated [1, 1, 2] after prompt token 4 (a pad and 4).
    ids = torch.tensor([[0, 4, 1, 1, 2], [0, 0, 3, 5, 5]])
    scores = torch.zeros(2, 6)
    reqs = [{"presence_penalty": 0.5, "frequency_penalty": 0.25}, {"frequency_penalty": -1.0, "logit_bias": {3: 2.0, 0: -100}}]
    got = RowSampler(reqs, width=2, device="cpu").adjust(ids, scores)
    # row 0: token 1 twice: -2*0.25 - 0.5; token 2 once: -0.25 - 0.5; the prompt's 4 is not counted
    assert got[0].tolist() == [0.0, -1.0, -0.75, 0.0, 0.0, 0.0]
    # row 1: 3 once, 5 twice with a negative frequency penalty (+1 per use); bias +2 on 3, -100 on 0
    assert got[1].tolist() == [-100.0, 0.0, 0.0, 3.0, 0.0, 2.0]
    out = RowSampler(reqs, width=2, device="cpu")(ids, scores)  # greedy: the argmax of the adjusted logits
    assert out.argmax(-1).tolist() == [0, 3] and torch.isinf(out).sum() == 10


def test_penalties_change_the_answer(engine):
    plain = engine.generate([_req(engine, max_tokens=16)])[0]["token_ids"]
    assert len(set(plain)) < len(plain)  # the random nano model repeats itself
    fresh = engine.generate([_req(engine, max_tokens=16, presence_penalty=2.0, frequency_penalty=2.0)])[0]["token_ids"]
    assert fresh != plain and len(set(fresh)) > len(set(plain))
    banned = plain[0]
    biased = engine.generate([_req(engine, max_tokens=16, logit_bias={banned: -100})])[0]["token_ids"]
    assert banned not in biased


# ------------------------------------------------------------------------------------ stop strings
def test_decoded_cuts_at_the_first_stop_and_holds_back_a_possible_start():
    pieces = {1: "x", 2: "a", 3: "c", 4: "b", 5: "yab", 6: "zz"}
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(pieces[i] for i in ids))
    d = Decoded(tok, ["ab", "zzz"])
    assert [d.push([i]) for i in (1, 2, 3, 2)] == ["x", "", "ac", ""]  # "a" may begin "ab": held back
    assert d.push([4]) == "" and d.cut == 3 and d.push([1]) == "" and d.flush() == ""  # "xaca|b": cut before it
    assert d.ready(final=True) == 3  # x, a, c: the tokens before the stop string
    d = Decoded(tok, ["ab", "zzz"])
    assert d.push([6]) == "" and d.push([5]) == "zzy" and d.cut == 3  # a token that runs past the stop string
    d = Decoded(tok, ["zzz"])
    assert d.push([6]) == "" and d.flush() == "zz"  # held, then no stop came
    assert find_stop("a-b-c", ["c", "-b", "x"]) == 1 and find_stop("abc", None) is None


def test_stop_strings_end_generation_and_are_cut_whole_and_streamed(engine):
    whole = engine.generate([_req(engine, max_tokens=16)])[0]
    text = _text(engine, whole)
    stop = text[6:8]  # two characters from the middle of the greedy answer
    cut = text.find(stop)
    assert 0 < cut and whole["finish_reason"] == "length"
    out = engine.generate([_req(engine, max_tokens=16, stop=[stop, "never there"])])[0]
    assert out["finish_reason"] == "stop" and len(out["token_ids"]) < len(whole["token_ids"])
    assert out["token_ids"] == whole["token_ids"][: len(out["token_ids"])]
    assert _text(engine, out, [stop]) == text[:cut]

    events: list[dict] = []
    end = engine.stream(_req(engine, max_tokens=16, stop=[stop]), events.append, threading.Event())
    assert end["finish_reason"] == "stop" and [t for e in events for t in e["token_ids"]] == out["token_ids"]
    d = Decoded(engine.tokenizer, [stop])
    assert "".join(d.push(e["token_ids"]) for e in events) + d.flush() == text[:cut]


# ------------------------------------------------------------------------------------ seed, logprobs
def test_seed_gives_the_same_sample(engine):
    a, b = (engine.generate([_req(engine, temperature=1.0, seed=7)])[0]["token_ids"] for _ in range(2))
    other = engine.generate([_req(engine, temperature=1.0, seed=8)])[0]["token_ids"]
    greedy = engine.generate([_req(engine)])[0]["token_ids"]
    assert a == b and a != other and a != greedy
    streamed: list[dict] = []
    engine.stream(_req(engine, temperature=1.0, seed=7), streamed.append, threading.Event())
    assert [t for e in streamed for t in e["token_ids"]] == a


def test_logprobs_are_the_models_own(engine, tiny_model):
    """Greedy: equal to transformers' compute_transition_scores; sampled with temperature, top_p and penalties:
    still the log-softmax of the model's logits at each generated token (a forward pass over the answer)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    req = _req(engine, logprobs=3)
    out = engine.generate([req])[0]
    ids = torch.tensor([req["input_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=len(out["token_ids"]), do_sample=False, output_logits=True, return_dict_in_generate=True)
        chosen = model.compute_transition_scores(ref.sequences, ref.logits, normalize_logits=True)[0]
    assert [e[0] for e in out["logprobs"]] == out["token_ids"] == ref.sequences[0, ids.shape[1] :].tolist()
    assert [e[1] for e in out["logprobs"]] == pytest.approx(chosen.tolist(), abs=1e-5)
    top = ref.logits[0].log_softmax(-1).topk(3)
    assert [[a[0] for a in e[2]] for e in out["logprobs"][:1]] == [top.indices[0].tolist()]
    assert [a[1] for a in out["logprobs"][0][2]] == pytest.approx(top.values[0].tolist(), abs=1e-5)

    req = _req(engine, temperature=1.3, top_p=0.9, seed=3, presence_penalty=1.0, frequency_penalty=0.5, logprobs=0)
    out = engine.generate([req])[0]
    full = torch.tensor([req["input_ids"] + out["token_ids"]])
    with torch.no_grad():
        lp = model(full).logits[0, len(req["input_ids"]) - 1 : -1].log_softmax(-1)
    want = lp.gather(1, torch.tensor(out["token_ids"])[:, None])[:, 0]
    assert [e[1] for e in out["logprobs"]] == pytest.approx(want.tolist(), abs=1e-4)
    assert all(e[2] == [] for e in out["logprobs"])


# ------------------------------------------------------------------------------------ batching
def test_mixed_settings_in_one_batch_equal_each_request_alone(engine):
    reqs = [
        _req(engine),
        _req(engine, "3+4=", temperature=1.0, seed=1),
        _req(engine, "3+4=", temperature=1.0, seed=2, max_tokens=5),
        _req(engine, temperature=0.7, top_p=0.8, seed=1, presence_penalty=1.5, logprobs=2),
        _req(engine, "19+19=", frequency_penalty=-1.0, logit_bias={7: 5.0}),
        _req(engine, "1+1=", temperature=1.0, seed=9, frequency_penalty=0.8, stop=["1", "2", "3"]),
        _req(engine, "1+1=", logprobs=0, max_tokens=3),
    ]
    together = engine.generate(reqs)
    assert {o["batch_size"] for o in together} == {len(reqs)}
    for r, t in zip(reqs, together, strict=True):
        alone = engine.generate([r])[0]
        assert t["token_ids"] == alone["token_ids"] and t["finish_reason"] == alone["finish_reason"], r
        if "logprobs" in alone:
            assert [e[1] for e in t["logprobs"]] == pytest.approx([e[1] for e in alone["logprobs"]], abs=1e-5)
            assert [[a[0] for a in e[2]] for e in t["logprobs"]] == [[a[0] for a in e[2]] for e in alone["logprobs"]]
    assert len(together[2]["token_ids"]) <= 5 and len({tuple(t["token_ids"]) for t in together}) == len(reqs)
