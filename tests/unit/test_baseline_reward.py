"""The baseline's reward generation on a fabricated model whose greedy path is known: vLLM's stop, EOS and
max-token rules, and the loss `EncodedReward.reward_batch` makes of the texts."""

from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models

from scheduler.baseline_reward import greedy_generations, greedy_text, stop_cut
from scheduler.rewards import EncodedReward

# Byte-level tokens: "Ġ" is a leading space, "Ċ" a newline.
VOCAB = {"<s>": 0, "</s>": 1, "<unk>": 2, "Ġit": 3, "Ġwas": 4, "Ġgreat": 5, "Ġbad": 6, "Ċ": 7, "Ġfilm": 8, "Ġso": 9}
EOS = 1
# The fake model's next token is NEXT[last token]: prompt "<s> it" → " was great\n film so film so …".
NEXT = {0: 3, 3: 4, 4: 5, 5: 7, 7: 8, 8: 9, 9: 8, 6: EOS, 2: 2, 1: 1}


def _backend() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok


class _ChainModel:
    """A causal LM stand-in: the argmax at the last position is NEXT[last input token]."""

    def __init__(self):
        self.num_calls = 0

    def __call__(self, input_ids, past_key_values=None, use_cache=True):
        self.num_calls += 1
        logits = torch.zeros(1, input_ids.shape[1], len(VOCAB))  # [1, L, V]
        logits[0, -1, NEXT[int(input_ids[0, -1])]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=("cache", self.num_calls))


def _greedy(prompt, max_new_tokens=8, stop=()):
    return greedy_text(_ChainModel(), _backend(), prompt, max_new_tokens=max_new_tokens, stop=stop, eos_ids={EOS})


def test_max_tokens_eos_and_stop_strings_follow_vllm():
    assert _greedy([0, 3], max_new_tokens=2) == " was great"
    assert _greedy([0, 3], max_new_tokens=5) == " was great\n film so"
    assert _greedy([0, 3], stop=("\n",)) == " was great"  # cut before the stop string
    assert _greedy([0, 3], stop=(" so", "\n")) == " was great"  # the earliest-ending stop string wins
    assert _greedy([0, 3], stop=("eat\n f",)) == " was gr"  # a stop string across token boundaries
    assert _greedy([0, 6]) == ""  # EOS first: nothing, and the EOS token is not detokenized
    assert _greedy([0, 5], max_new_tokens=1) == "\n"


def test_one_forward_per_new_token_until_the_stop():
    model = _ChainModel()
    greedy_text(model, _backend(), [0, 3], max_new_tokens=8, stop=("\n",), eos_ids={EOS})
    assert model.num_calls == 3  # " was", " great", "\n": no forward after the stop string completes


@pytest.mark.parametrize(
    "text, num_new, stop, expected",
    [
        ("a great\n", 1, ("\n",), 7),
        ("ab\ncd", 2, ("\n",), None),  # the stop string lies wholly in text already searched
        ("abcd", 1, ("bcd", "cd"), 1),  # both end at the new character: stop-list order
        ("abcd", 1, ("cd", "bcd"), 2),
        ("abcd", 0, ("d",), None),
    ],
)
def test_stop_cut(text, num_new, stop, expected):
    assert stop_cut(text, num_new, stop) == expected


def test_loss_of_a_fabricated_minibatch_by_hand():
    # Example 0 says " was great" (contains "great": reward 1), 1 says " film so film so" (0), 2 says "" (0),
    # 3 says " was great" again but its reference is "was great film" (0 under exact as under contains).
    data = EncodedReward(
        prompts=((0, 3), (0, 7), (0, 6), (0, 3)),
        references=(("great",), ("bad",), ("great",), ("was great film",)),
        match="contains",
        max_new_tokens=4,
        stop=("\n",),
    )
    texts = greedy_generations(_ChainModel(), _backend(), data, [0, 1, 2, 3], eos_ids={EOS})
    assert texts == [" was great", " film so film so", "", " was great"]
    score = data.reward_batch([0, 1, 2, 3], texts)
    assert (score.loss, score.num_correct, score.num_examples) == (0.75, 1, 4)
    # Under a minibatch in another order (and with repeats) the loss follows its rows.
    again = greedy_generations(_ChainModel(), _backend(), data, [3, 0, 0], eos_ids={EOS})
    assert data.reward_batch([3, 0, 0], again).loss == pytest.approx(1 / 3)
