"""Follow-up Likelihood as Reward: prefix-shared scoring, which tokens are scored, both variants, Direct, errors."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from nca_kit.logps import RewardCollator, sequence_logps, tokenize_reward_record
from nca_kit.models import tiny_model, tiny_tokenizer
from nca_kit import plots
from nca_kit.rewards import followup as flr
from nca_kit.rewards import followup_texts, metrics, studies
from nca_kit.rewards.sources import with_rewards


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request):
    return tiny_model(request.param, seed=1).eval()


SMALL = {  # two categories, follow-ups of different lengths
    "a": {"positive": ["yes, thanks!", "That is exactly right."], "negative": ["no", "Sorry, that is wrong."]},
    "b": {"positive": ["Great answer, thank you so much."], "negative": ["meh", "What?"]},
}
PROMPTS = ["What is two plus two?", [{"role": "user", "content": "hello"}],
           "Write a short poem about the sea, please, and make it rhyme.", "What is two plus two?"]
RESPONSES = ["Four.", "hello there, how are you doing today?", "The sea is wide and blue.", "Five"]


@pytest.mark.parametrize("layout", ["tree", "cache"])
def test_prefix_shared_and_naive_logps_agree_with_plain_logits(model, layout):
    # prefixes of different lengths (padding), continuations of different lengths (padding; tree: packed in one row)
    prefixes = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14], [20, 21, 22, 23, 24]]
    continuations = [[[1, 2, 3], [4]], [[7, 8, 9, 10, 11, 12]], [[3], [3, 4, 5, 6], [9, 9]]]
    with torch.no_grad():
        shared, mask = flr.prefix_shared_logps(model, prefixes, continuations, layout=layout)
        naive, naive_mask = flr.prefix_shared_logps(model, prefixes, continuations, share_prefix=False)
    assert shared.shape == (6, 6) and torch.equal(mask, naive_mask)
    assert torch.allclose(shared, naive, atol=1e-4)
    flat = [(p, c) for p, group in zip(prefixes, continuations) for c in group]
    for n, (p, c) in enumerate(flat):
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)  # (S, V)
        expected = torch.stack([logps[len(p) - 1 + t, c[t]] for t in range(len(c))])
        assert torch.allclose(shared[n, : len(c)], expected, atol=1e-4)
        assert mask[n].sum() == len(c) and not shared[n, len(c):].any()


@pytest.mark.parametrize("layout", ["tree", "cache"])
def test_flr_scores_shared_and_naive_agree(model, tok, layout):
    shared = flr.flr_scores(model, tok, PROMPTS, RESPONSES, followups=SMALL, batch_size=5, layout=layout,
                            progress=False)
    naive = flr.flr_scores(model, tok, PROMPTS, RESPONSES, followups=SMALL, batch_size=3, share_prefix=False,
                           progress=False)
    assert shared.loglik.shape == shared.logit.shape == (4, 7)
    np.testing.assert_allclose(shared.loglik, naive.loglik, atol=1e-4)
    np.testing.assert_allclose(shared.logit, naive.logit, atol=1e-4)
    np.testing.assert_allclose(shared.rewards(), naive.rewards(), atol=1e-4)


def test_tree_layout_gradients_equal_the_naive_forward(model):
    prefixes = [[5, 6, 7, 8, 9], [13, 14]]
    continuations = [[[1, 2, 3], [4], [8, 8]], [[7, 8, 9, 10]]]
    grads = {}
    for name, options in {"naive": dict(share_prefix=False), "tree": dict(layout="tree")}.items():
        model.zero_grad()
        logps, mask = flr.prefix_shared_logps(model, prefixes, continuations, **options)
        (logps * torch.arange(1, logps.shape[0] + 1)[:, None]).sum().backward()  # a different weight per row
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert grads["tree"].keys() == grads["naive"].keys() and grads["tree"]
    for n in grads["naive"]:
        torch.testing.assert_close(grads["tree"][n], grads["naive"][n], atol=1e-5, rtol=1e-4)


def test_tree_mask_keeps_continuations_apart(model):
    # one prefix, two continuations: the second one's log-probs must not depend on the first one's tokens
    with torch.no_grad():
        a, _ = flr.prefix_shared_logps(model, [[5, 6, 7]], [[[1, 2, 3], [9, 10]]], layout="tree")
        b, _ = flr.prefix_shared_logps(model, [[5, 6, 7]], [[[40, 41, 42], [9, 10]]], layout="tree")
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def test_layout_errors(model):
    with pytest.raises(ValueError, match="layout must be one of"):
        flr.prefix_shared_logps(model, [[1, 2]], [[[3]]], layout="flat")
    from nca_kit import packing

    implementation = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="custom 4D"):
            packing.tree_states(model, [[1, 2]], [[[3]]])
        assert flr._layout(model, "auto") == "cache"
    finally:
        model.config._attn_implementation = implementation
    assert flr._layout(model, "auto") == "tree"


def test_followup_tokens_are_scored_not_the_template(tok):
    text = "That is exactly right."
    own = tok(text, add_special_tokens=False)["input_ids"]
    header = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    closing = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    turn = followup_texts.followup_tokens(tok, text)
    assert list(turn.ids) == header + own + closing
    assert list(turn.ids[turn.span[0]:turn.span[1]]) == own


def test_scores_equal_a_hand_built_conversation(tok):
    """Variant "paper" = mean log-prob of the follow-up's tokens in the full conversation; variant "code" = the public
    code's expression ``logits[0, -L:, :][0, ids].mean()`` on the conversation tokenized by the chat template."""
    model = tiny_model("llama", seed=3).eval()
    followups = {"c": {"positive": ["That is exactly right."], "negative": ["no"]}}
    prompt, response = "What is two plus two?", "Four."
    scores = flr.flr_scores(model, tok, [prompt], [response], followups=followups, progress=False)
    for column, text in enumerate(["That is exactly right.", "no"]):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        prefix = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        own = tok(text, add_special_tokens=False)["input_ids"]
        header = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
        closing = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
        full = prefix + header + own + closing
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits  # (1, S, V)
        logps = logits[0].log_softmax(-1)
        start = len(prefix) + len(header)
        expected = np.mean([logps[start + t - 1, own[t]].item() for t in range(len(own))])
        assert scores.loglik[0, column] == pytest.approx(expected, abs=1e-4)
        rendered = tok.apply_chat_template(messages + [{"role": "user", "content": text}], tokenize=False)
        assert tok(rendered, add_special_tokens=False)["input_ids"] == full
        feedback_ids = torch.tensor(tok(text)["input_ids"])
        public_code = logits[0, -len(feedback_ids):, :][0, feedback_ids].mean().item()
        assert scores.logit_literal[0, column] == pytest.approx(public_code, abs=1e-4)
        at_first = logits[0, start, feedback_ids].mean().item()  # the state at the follow-up's first token
        assert scores.logit[0, column] == pytest.approx(at_first, abs=1e-4)
    assert scores.rewards()[0] == pytest.approx(scores.loglik[0, 0] - scores.loglik[0, 1])


def test_preferring_a_positive_followup_raises_the_reward(tok):
    """Train the model (through prefix_shared_logps, gradients on) to like the positive follow-up after this answer:
    the reward goes up, and the gradient path is the one a shared-prompt training forward would use."""
    model = tiny_model("mistral", seed=0)
    followups = {"c": {"positive": ["yes, thanks!"], "negative": ["That is wrong."]}}
    prompt, response = "What is two plus two?", "Four."
    before = flr.flr_rewards(model, tok, [prompt], [response], followups=followups, progress=False)[0]
    messages = [{"role": "user", "content": prompt}]
    prefix = followup_texts.conversation_prefix(tok, messages, response, 1024)
    turn = followup_texts.followup_tokens(tok, "yes, thanks!")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        logps, _ = flr.prefix_shared_logps(model, [prefix], [[turn.ids]])
        loss = -logps[0, turn.span[0]:turn.span[1]].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = flr.flr_rewards(model, tok, [prompt], [response], followups=followups, progress=False)[0]
    assert after > before + 1.0, (before, after)


def test_direct_equals_the_kits_sequence_logprob_over_length(model, tok):
    direct = flr.direct_rewards(model, tok, PROMPTS, RESPONSES, batch_size=2, progress=False)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        record = tokenize_reward_record({"prompt": prompt, "responses": [response], "rewards": [0.0]}, tok)
        batch = RewardCollator(tok.pad_token_id)([record])
        with torch.no_grad():
            total = sequence_logps(model, batch)[0, 0].item()
        assert direct[i] == pytest.approx(total / len(record["response_input_ids"][0]), abs=1e-4)
    naive = flr.direct_rewards(model, tok, PROMPTS, RESPONSES, share_prefix=False, progress=False)
    np.testing.assert_allclose(direct, naive, atol=1e-4)


def test_scores_are_cached_on_disk(tok, tmp_path):
    model = tiny_model("llama", seed=2).eval()
    first = flr.flr_scores(model, tok, PROMPTS, RESPONSES, followups=SMALL, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.glob("flr_*.npy"))

    def broken(*args, **kwargs):
        raise AssertionError("the model ran although the scores are cached")

    model.forward = broken
    again = flr.flr_scores(model, tok, PROMPTS, RESPONSES, followups=SMALL, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(first.loglik, again.loglik)
    with pytest.raises(AssertionError, match="the model ran"):  # other texts: a new key
        flr.flr_scores(model, tok, PROMPTS, RESPONSES[::-1], followups=SMALL, cache_dir=tmp_path, progress=False)


def test_categories_and_json_followups(tok, tmp_path):
    path = tmp_path / "followups.json"
    path.write_text(json.dumps(SMALL))
    assert followup_texts.load_followups(path) == {c: {p: tuple(t) for p, t in v.items()} for c, v in SMALL.items()}
    assert list(followup_texts.load_followups(categories=["relevance", "correctness"])) == ["relevance", "correctness"]
    default = followup_texts.load_followups()
    assert list(default) == list(followup_texts.CATEGORIES)
    assert all(len(v[p]) >= 10 for v in default.values() for p in followup_texts.POLARITIES)
    model = tiny_model("llama", seed=2).eval()
    scores = flr.flr_scores(model, tok, PROMPTS[:2], RESPONSES[:2], followups=path, progress=False)
    per_category = scores.category_rewards()
    assert set(per_category) == {"a", "b"}
    # equal-size categories would average exactly; here "a" has 2+2 and "b" 1+2 follow-ups: check the definition
    pos = [0, 1, 4]
    neg = [2, 3, 5, 6]
    np.testing.assert_allclose(scores.rewards(), scores.loglik[:, pos].mean(1) - scores.loglik[:, neg].mean(1))
    np.testing.assert_allclose(per_category["b"], scores.loglik[:, 4] - scores.loglik[:, 5:].mean(1))


def test_follow_up_scores_rescore_a_dataset_canonically(tok):
    model = tiny_model("llama", seed=2).eval()
    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "responses": ["4", "5", "22"],
             "rewards": [10.0, 0.0, 1.0], "id": "a"},
            {"prompt": [{"role": "user", "content": "What is 3 + 1?"}], "responses": ["4", "I think 3"],
             "rewards": [10.0, 0.0], "id": "b"}]
    ds = datasets.Dataset.from_list(rows)
    for scorer in flr.SCORERS:
        extra = {"followups": "arithmetic"} if scorer == "flr" else {}
        rows = flr.score_rows(ds, scorer, model, tok, progress=False, **extra)
        out = with_rewards(ds, rows, keep_as="original_rewards")
        assert {"prompt", "responses", "rewards"} <= set(out.column_names)
        assert [len(r) for r in out["rewards"]] == [3, 2]
        assert out["original_rewards"] == ds["rewards"] and out["id"] == ["a", "b"]
    direct = flr.direct_rewards(model, tok, ["What is 3 + 1?"], ["I think 3"], progress=False)
    assert out["rewards"][1][1] == pytest.approx(direct[0])


def test_metrics():
    acc = metrics.accuracy_interval(metrics.pair_wins(*metrics.chosen_rejected([1.0, 2.0, 3.0, 0.0],
                                                                               [0.0, 1.0, 3.0, 1.0])))
    assert acc["accuracy"] == pytest.approx(0.625) and acc["ties"] == 1 and acc["n"] == 4
    assert acc["low"] < 0.625 < acc["high"]
    golden = [[10, 0, 3, 3], [1, 1, 1, 1]]
    scores = [[0.9, 0.1, 0.5, 0.2], [4, 3, 2, 1]]
    m = metrics.ranking_metrics(scores, golden)
    assert m["n_spearman"] == 1 and m["spearman"] == pytest.approx(np.corrcoef([4, 1, 2.5, 2.5], [4, 1, 3, 2])[0, 1])
    assert m["n_pairs"] == 5 and m["pair_accuracy"] == pytest.approx(1.0)
    assert m["best_of_k"] == pytest.approx(5.5) and m["oracle"] == pytest.approx(5.5)


@pytest.mark.parametrize("call, match", [
    (lambda m, t: flr.flr_rewards(m, t, ["q"], ["a"], followups={"c": {"positive": [], "negative": ["no"]}}),
     "followups: category 'c' has no positive"),
    (lambda m, t: flr.flr_rewards(m, t, ["q", "r"], ["a", " "]), r"responses\[1\] is empty"),
    (lambda m, t: flr.direct_rewards(m, t, ["q", "r"], ["a"]), "responses: 1 given but prompts has 2"),
    (lambda m, t: flr.flr_rewards(m, t, ["q"], ["a"], variant="logits"), "variant must be one of"),
    (lambda m, t: flr.flr_rewards(m, t, ["q"], ["a"], categories=["style"]), r"categories: \['style'\]"),
])
def test_bad_input_names_the_argument(tok, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model("llama"), tok)


def test_tokenizer_without_chat_template_says_how_to_set_one():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="tokenizer has no chat template; set tokenizer.chat_template"):
        flr.flr_rewards(tiny_model("llama"), tok, ["q"], ["a"])
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        flr.direct_rewards(tiny_model("llama"), tok, ["q"], ["a"])


def test_accuracy_difference_is_paired():
    a_c, a_r = [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]  # 3 of 4 right
    wins_a = metrics.pair_wins(*metrics.chosen_rejected(a_c, a_r))
    same = metrics.accuracy_difference(wins_a, wins_a)
    assert same["difference"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0
    d = metrics.accuracy_difference(wins_a, metrics.pair_wins(*metrics.chosen_rejected([0.0] * 4, [1.0] * 4)))
    assert d["difference"] == pytest.approx(0.75) and d["low"] <= 0.75 <= d["high"] and d["n"] == 4


def test_hh_pairs_are_prefixes_of_one_seeded_order():
    from nca_kit.data import hh_rlhf_local_path

    path = hh_rlhf_local_path() or Path(__file__).resolve().parents[1] / "data" / "hh_rlhf_sample.jsonl"
    small, large, every = studies.hh_pairs(2, seed=3, path=path), studies.hh_pairs(10**6, seed=3, path=path), \
        studies.hh_pairs(None, seed=3, path=path)
    assert small["chosen"] == large["chosen"][:2] and large["chosen"] == every["chosen"]


def test_pair_accuracy_figure_names_the_band_and_the_chance_line():
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    table = pd.DataFrame([
        {"scorer": "Direct", "category": "-", "accuracy": 0.55, "low": 0.4, "high": 0.7, "n": 16},
        {"scorer": "FLR (paper)", "category": "all", "accuracy": 0.6, "low": 0.45, "high": 0.75, "n": 16},
        {"scorer": "FLR (code)", "category": "all", "accuracy": 0.5, "low": 0.35, "high": 0.65, "n": 16},
    ])
    ax = plots.plot_pair_accuracy(table)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Direct's 95 % interval" in labels and "chance (0.5)" in labels


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llama3_style_tokenizer():
    """The tiny tokenizer with Llama-3's turn markers as special tokens, a BOS added by ``tokenizer(text)`` (as
    Llama-3's tokenizer does), and Llama-3's chat template (one closing ``<|eot_id|>`` per turn)."""
    from tokenizers import processors

    tok = flr_tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def flr_tiny_tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("template, literal_shift", [("llama3", 0), ("chatml", 2)])
def test_code_variant_reads_the_followups_first_token_on_every_template(template, literal_shift):
    """On a Llama-3-style template the public code's literal ``logits[-L]`` is the state at the follow-up's first
    token, so "code" and "code_literal" agree; on ChatML (SmolLM2's template, ``<|im_end|>\n`` closes a turn,
    no BOS) the literal offset reads the state at the follow-up's third token, and only "code" stays on the first."""
    tok = llama3_style_tokenizer() if template == "llama3" else tiny_tokenizer()
    text = "That is not what I asked."
    turn = followup_texts.followup_tokens(tok, text)
    assert turn.code_position == turn.span[0] + 1  # the state at token span[0] predicts token span[0] + 1
    assert turn.literal_position == turn.code_position + literal_shift
    model = tiny_model("llama", vocab_size=len(tok), seed=5).eval()
    prompt, response = "What is two plus two?", "Four."
    scores = flr.flr_scores(model, tok, [prompt], [response], followups={"c": {"positive": [text], "negative": ["no"]}},
                            progress=False)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    rendered = tok.apply_chat_template(messages + [{"role": "user", "content": text}], tokenize=False)
    full = tok(rendered, add_special_tokens=False)["input_ids"]
    own = tok(text, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(full) - len(own), -1, -1) if full[i:i + len(own)] == own)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0]  # (S, V)
    feedback_ids = torch.tensor(tok(text)["input_ids"])  # special tokens included, as the public code
    if template == "llama3":
        assert feedback_ids[0].item() == tok.convert_tokens_to_ids("<|begin_of_text|>")
    literal = logits[-len(feedback_ids):, :][0, feedback_ids].mean().item()
    first = logits[start, feedback_ids].mean().item()
    assert scores.logit_literal[0, 0] == pytest.approx(literal, abs=1e-4)
    assert scores.logit[0, 0] == pytest.approx(first, abs=1e-4)
    if literal_shift:
        assert abs(literal - first) > 1e-3  # the fixed offset really reads another state here
    else:
        assert scores.logit[0, 0] == pytest.approx(scores.logit_literal[0, 0], abs=1e-6)
    for variant in flr.VARIANTS:
        assert scores.rewards(variant).shape == (1,)
