"""The generative reward model's plumbing: judge prompts in the chat format, verdict parsing (malformed -> unparsed),
agreement against a scripted judge, judge SFT data, and one batched greedy pass of a real tiny model."""
import random

import pytest
import torch

import dsv4
from dsv4.errors import InvalidArgument
from dsv4.generate.chat import ASSISTANT, EOS, THINK_END, encode_chat
from dsv4.posttrain.envs import Environment
from dsv4.posttrain.envs.base import Problem
from dsv4.posttrain.envs.rubric import BAD_KINDS, RubricEnv
from dsv4.posttrain.grm import (UNPARSED, GenerativeRewardModel, JudgedEnv, agreement, judge_demonstrations,
                                judge_messages, parse_verdict, verdict_text)
from dsv4.train.tokenizer import train_bpe


class ScriptedGRM(GenerativeRewardModel):
    """A judge whose reply to each prompt text comes from `script(prompt)`: the model never runs."""

    def __init__(self, script, rubric=None):
        super().__init__(None, None, rubric)
        self.script, self.seen = script, []

    def complete(self, prompts):
        self.seen.append(len(prompts))
        return [self.script(p) for p in prompts]


def test_rubric_env_protocol_and_labels():
    env = RubricEnv("easy")
    assert isinstance(env, Environment) and env.max_turns == 1
    held = env.heldout(12)
    assert env.heldout(12) == held and all("rubric" in p.meta for p in held)
    ids = {p.id for p in held}
    rng = random.Random(0)
    assert all(env.sample(rng).id not in ids for _ in range(300))
    assert env.sample(random.Random(4)) == env.sample(random.Random(4))
    assert env.judge_examples(6, random.Random(4)) == env.judge_examples(6, random.Random(4))
    for p in held:
        assert env.reward(p, env.demonstrate(p)).correct
    p = held[0]
    for kind in BAD_KINDS:
        text = env.bad_answer(p, random.Random(1), kind)
        r = env.reward(p, [{"role": "assistant", "content": text}])
        failed = [k for k, ok in r.info["clauses"].items() if not ok]
        assert not r.correct and {"wrong_part": "no_other_part", "no_part": "mentions_part",
                                  "no_thing": "names_thing", "too_long": "short"}[kind] in failed, (kind, text)


def test_judge_prompt_renders_in_the_chat_format():
    env = RubricEnv("medium")
    p = env.heldout(1)[0]
    messages = judge_messages(p, "A cat has fur.")
    text = encode_chat(messages)
    assert p.meta["rubric"] in text and p.messages[-1]["content"] in text and "Answer: A cat has fur." in text
    assert text.endswith(ASSISTANT + THINK_END)
    assert "Rubric: be brief" in encode_chat(judge_messages(p, "x", rubric="be brief"))
    with pytest.raises(InvalidArgument, match="no meta\\['rubric'\\]"):
        judge_messages(Problem("x", "x-1", [{"role": "user", "content": "q"}], None), "a")


@pytest.mark.parametrize("text, verdict", [
    ("Verdict: good", "good"), ("verdict: BAD.", "bad"), (" Verdict:good \n", "good"),
    ("Verdict: bad" + EOS, "bad"), ("Verdict: good" + EOS + "trailing", "good"),
    ("Verdict: goodish", UNPARSED), ("Verdict: good and bad", UNPARSED), ("good", UNPARSED), ("", UNPARSED),
    ("The verdict: good", UNPARSED), ("Score: 7", UNPARSED)])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_agreement_against_a_scripted_judge():
    env = RubricEnv("easy")
    examples = env.judge_examples(40)
    assert sum(good for *_, good in examples) == 20
    truth = {GenerativeRewardModel(None, None).prompt(p, a): good for p, a, good in examples}
    oracle = ScriptedGRM(lambda prompt: verdict_text(truth[prompt]))
    result = agreement(oracle, env, 40)
    assert result == {"rate": 1.0, "n": 40, "unparsed": 0,
                      "confusion": {"good": {"good": 20, "bad": 0, UNPARSED: 0},
                                    "bad": {"good": 0, "bad": 20, UNPARSED: 0}}}
    assert oracle.seen == [40]   # one batched judging pass

    # says "good" to everything, except every third prompt where it rambles
    order = [GenerativeRewardModel(None, None).prompt(p, a) for p, a, _ in examples]
    def sloppy(prompt):
        return "I think it is fine" if order.index(prompt) % 3 == 0 else "Verdict: good"
    result = agreement(ScriptedGRM(sloppy), env, 40)
    unparsed_good = sum(1 for i in range(0, 40, 3) if examples[i][2])
    unparsed_bad = sum(1 for i in range(0, 40, 3) if not examples[i][2])
    assert result["unparsed"] == unparsed_good + unparsed_bad == 14
    assert result["confusion"]["good"] == {"good": 20 - unparsed_good, "bad": 0, UNPARSED: unparsed_good}
    assert result["confusion"]["bad"] == {"good": 20 - unparsed_bad, "bad": 0, UNPARSED: unparsed_bad}
    assert result["rate"] == pytest.approx((20 - unparsed_good) / 40)


def test_judge_demonstrations_teach_the_rule_on_fresh_problems():
    env = RubricEnv("easy")
    held = {p.id for p in env.heldout(12)}
    convs = judge_demonstrations(env, 30, seed=3)
    assert convs == judge_demonstrations(env, 30, seed=3) and len(convs) == 30
    examples = env.judge_examples(30, random.Random(3))
    assert all(p.id not in held for p, _, _ in examples)
    for conv, (p, a, good) in zip(convs, examples):
        assert [m["role"] for m in conv] == ["system", "user", "assistant"]
        assert parse_verdict(conv[-1]["content"]) == ("good" if good else "bad")
        assert good == env.reward(p, [{"role": "assistant", "content": a}]).correct
        assert encode_chat(conv).endswith(conv[-1]["content"] + EOS)
    assert sum(parse_verdict(c[-1]["content"]) == "good" for c in convs) == 15


def test_judged_env_rewards_with_the_verdict_and_logs_the_rule():
    env = RubricEnv("easy")
    p = env.heldout(1)[0]
    judged = JudgedEnv(env, ScriptedGRM(lambda prompt: "Verdict: good"))
    assert isinstance(judged, Environment) and judged.name == "rubric"
    bad = [{"role": "assistant", "content": env.bad_answer(p, random.Random(0), "no_part")}]
    r = judged.reward(p, bad)
    assert (r.score, r.correct, r.info["verdict"], r.info["rule_correct"]) == (1.0, True, "good", False)
    rewards = judged.reward_batch([(p, []), (p, env.demonstrate(p))])
    assert rewards[0].score == 0.0 and rewards[0].info["verdict"] == UNPARSED
    assert rewards[1].info["rule_correct"] and judged.grm.seen[-1] == 1   # the missing reply is not judged


def test_a_tiny_model_judges_in_one_batched_greedy_pass(tmp_path):
    env = RubricEnv("easy")
    convs = judge_demonstrations(env, 20)
    tok = train_bpe([encode_chat(c) for c in convs], 400, tmp_path)
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).eval()
    examples = env.judge_examples(4)
    grm = GenerativeRewardModel(model, tok, max_new_tokens=4, batch_size=4)
    rewards = grm.score_batch([(p, a) for p, a, _ in examples])
    assert len(rewards) == 4 and all(r.info["verdict"] in ("good", "bad", UNPARSED) for r in rewards)
    assert all(r.score == float(r.info["verdict"] == "good") for r in rewards)
    one_by_one = GenerativeRewardModel(model, tok, max_new_tokens=4, batch_size=1)
    assert [r.info["judge_text"] for r in one_by_one.score_batch([(p, a) for p, a, _ in examples])] == \
        [r.info["judge_text"] for r in rewards]
    result = agreement(grm, env, 4)
    assert result["n"] == 4 and sum(sum(row.values()) for row in result["confusion"].values()) == 4
    with pytest.raises(InvalidArgument, match="max_new_tokens=0"):
        GenerativeRewardModel(model, tok, max_new_tokens=0)
