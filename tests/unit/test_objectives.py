"""Objectives turn examples into scoring sequences and scores into the MeZO/LoZO classification loss."""

import math

from scheduler.objectives import ClassificationObjective, CompletionObjective, LabelledText, PromptCompletion
from scheduler.sampling import batch_indices
from scheduler.scoring import SequenceScores


class _WordTokenizer:
    """Whitespace tokenizer with a BOS; ' terrible' is two tokens, the others one."""

    bos_token_id = 1
    vocab = {"terrible": [10, 11], "great": [12], "bad": [13], "good": [14]}

    def __call__(self, text, add_special_tokens=True):
        ids = [] if not add_special_tokens else [self.bos_token_id]
        for word in text.split():
            ids += self.vocab.get(word, [100 + len(word)])
        return type("Enc", (), {"input_ids": ids})()


def test_single_token_options_use_last_position_and_cross_entropy():
    objective = ClassificationObjective(options=(" bad", " good"))
    data = objective.encode(_WordTokenizer(), [LabelledText("fine film", 1), LabelledText("dull", 0)], 64)
    assert data.single_token_options
    seqs = data.sequences([0, 1])
    assert seqs[0].candidate_ids == (13, 14) and seqs[0].token_ids == (1, 104, 104, 102, 103)
    scores = [SequenceScores((math.log(0.2), math.log(0.6))), SequenceScores((math.log(0.5), math.log(0.1)))]
    result = data.score_batch([0, 1], scores)
    expected = (-math.log(0.6 / 0.8) - math.log(0.5 / 0.6)) / 2
    assert math.isclose(result.loss, expected, rel_tol=1e-12)
    assert result.num_correct == 2


def test_multi_token_options_average_token_logprobs():
    data = ClassificationObjective().encode(_WordTokenizer(), [LabelledText("ok", 0)], 64)
    assert not data.single_token_options
    seqs = data.sequences([0])
    assert [s.token_ids[s.target_start :] for s in seqs] == [(10, 11), (12,)]
    scores = [SequenceScores((-1.0, -3.0)), SequenceScores((-1.5,))]
    logits = [-2.0, -1.5]
    expected = math.log(math.exp(logits[0]) + math.exp(logits[1])) - logits[0]
    assert math.isclose(data.score_batch([0], scores).loss, expected, rel_tol=1e-12)


def test_long_contexts_are_truncated_keeping_bos_and_the_end():
    data = ClassificationObjective(options=(" bad", " good")).encode(_WordTokenizer(), [LabelledText("x " * 50, 0)], 16)
    context = data.contexts[0]
    assert len(context) <= 14 and context[0] == 1 and context[-2:] == (102, 103)


def test_completion_loss_is_mean_negative_logprob():
    data = CompletionObjective().encode(_WordTokenizer(), [PromptCompletion("q", " great good")], 64)
    (seq,) = data.sequences([0])
    assert seq.token_ids[seq.target_start :] == (12, 14)
    assert data.score_batch([0], [SequenceScores((-1.0, -2.0))]).loss == 1.5


def test_batches_cover_each_epoch_once_and_are_deterministic():
    first_epoch = [i for step in range(5) for i in batch_indices(3, step, 4, 20)]
    assert sorted(first_epoch) == list(range(20))
    assert batch_indices(3, 7, 4, 20) == batch_indices(3, 7, 4, 20)
    assert batch_indices(3, 0, 4, 20) != batch_indices(4, 0, 4, 20)
    assert len(batch_indices(0, 2, 8, 5)) == 8  # batch larger than the data wraps into the next epoch
