"""The reward objective's pure part: match rules, encoding, and the 1 − mean-reward loss."""

import pytest

from scheduler.objectives import PromptCompletion
from scheduler.rewards import RewardObjective, reward, reward_loss, words


class _WordTokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = [self.bos_token_id] if add_special_tokens else []
        return type("Enc", (), {"input_ids": ids + [100 + len(w) for w in text.split()]})()


def test_words_ignore_case_punctuation_and_spacing():
    assert words("  Great, FILM!\n") == ("great", "film")
    assert words("...") == ()


@pytest.mark.parametrize(
    "generation, references, expected",
    [
        (" Great.", ("great",), 1.0),
        ("great film", ("great",), 0.0),  # exact: extra words fail
        ("GREAT   film", ("great film",), 1.0),
        ("terrible", ("great", "terrible"), 1.0),  # any reference
        ("", ("great",), 0.0),
    ],
)
def test_exact_match(generation, references, expected):
    assert reward(generation, references, "exact") == expected


@pytest.mark.parametrize(
    "generation, references, expected",
    [
        (" it was great fun", ("great",), 1.0),
        (" it was greatly fun", ("great",), 0.0),  # a word, not a substring
        ("so, New York!", ("new york",), 1.0),
        ("york new", ("new york",), 0.0),  # contiguous and in order
        ("a", ("...",), 0.0),  # a reference without words never matches
    ],
)
def test_contains_match(generation, references, expected):
    assert reward(generation, references, "contains") == expected


def test_unknown_rule_and_empty_batch_are_errors():
    with pytest.raises(ValueError, match="match"):
        reward("x", ("x",), "fuzzy")
    with pytest.raises(ValueError, match="rewards"):
        reward_loss([])


def test_loss_is_one_minus_mean_reward():
    assert reward_loss([1.0, 0.0, 1.0, 1.0]) == 0.25
    data = RewardObjective(match="contains").encode(
        _WordTokenizer(), [PromptCompletion("q one", "yes"), PromptCompletion("q two", "no"), PromptCompletion("q", "maybe")], 64
    )
    score = data.reward_batch([2, 0, 1], ["Maybe so", "no", "no"])  # 2 matches ("maybe", "no"), "yes" missed
    assert score.loss == pytest.approx(1 - 2 / 3) and score.num_correct == 2 and score.num_examples == 3


def test_encode_applies_template_truncates_and_reserves_room_for_generation():
    objective = RewardObjective(template="Q: {prompt} A:", max_new_tokens=4)
    data = objective.encode(_WordTokenizer(), [PromptCompletion("a b", "x"), PromptCompletion("w " * 40, "y")], 16)
    assert data.prompts[0] == (1, 102, 101, 101, 102)
    assert len(data.prompts[1]) <= 16 - 4 - 1 and data.prompts[1][0] == 1 and data.prompts[1][-1] == 102
    assert data.references == (("x",), ("y",))
    assert [s.token_ids for s in data.sequences([1, 0])] == [data.prompts[1], data.prompts[0]]
    assert len(data.extended(data)) == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"template": "no placeholder"}, "template"),
        ({"template": "{prompt} {other}"}, "template"),
        ({"match": "regex"}, "match"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10_000}, "max_new_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_objective_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        RewardObjective(**kwargs)


def test_reference_without_words_is_rejected_at_encode():
    with pytest.raises(ValueError, match=r"examples\[0\].completion"):
        RewardObjective().encode(_WordTokenizer(), [PromptCompletion("q", "?!")], 64)


def test_reward_job_spec_survives_the_journal():
    from scheduler.job_journal import spec_from_json, spec_to_json
    from scheduler.jobs import JobSpec

    spec = JobSpec("a", (PromptCompletion("p", "great"),), RewardObjective("Q {prompt}", "exact", 5, ("\n",)))
    assert spec_from_json(spec_to_json(spec)) == spec
