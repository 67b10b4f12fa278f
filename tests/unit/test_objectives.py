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
    context = data.contexts[0]
    # The option trie: the context scores both first tokens, context + " terr" scores "ible"; no prompt log-probs.
    assert [(s.token_ids, s.candidate_ids) for s in seqs] == [(context, (10, 12)), (context + (10,), (11,))]
    scores = [SequenceScores((-1.0, -1.5)), SequenceScores((-3.0,))]
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


def test_option_trie_shares_prefixes_and_keeps_option_order():
    from scheduler.objectives import option_trie

    trie = option_trie(((5, 6, 7), (5, 8), (9,), (5, 6)))
    assert trie.nodes == (((), (5, 9)), ((5,), (6, 8)), ((5, 6), (7,)))
    assert trie.paths == (((0, 0), (1, 0), (2, 0)), ((0, 0), (1, 1)), ((0, 1),), ((0, 0), (1, 0)))
    single = option_trie(((3,), (4,)))
    assert single.nodes == (((), (3, 4)),) and single.paths == (((0, 0),), ((0, 1),))


def test_multi_token_logits_match_a_per_option_sum():
    """Trie scoring gives each option the sum of its tokens' log-probs, as scoring each option whole would."""
    data = ClassificationObjective(options=(" terrible", " great", " terrible great")).encode(
        _WordTokenizer(), [LabelledText("ok", 2), LabelledText("no", 0)], 64
    )
    trie_sequences = data.sequences([0, 1])
    table = {}  # (context-with-prefix, next token) -> a made-up log-prob, as a model would give

    def logprob(prefix, token):
        return table.setdefault((prefix, token), -0.1 * (len(table) + 1))

    scores = [SequenceScores(tuple(logprob(s.token_ids, t) for t in s.candidate_ids)) for s in trie_sequences]
    for row, i in zip(data.class_logits([0, 1], scores), [0, 1]):
        for option, value in zip(data.option_ids, row):
            tokens = data.contexts[i] + option
            expected = sum(logprob(tokens[:k], tokens[k]) for k in range(len(data.contexts[i]), len(tokens))) / len(option)
            assert math.isclose(value, expected, rel_tol=1e-12)


def test_batches_follow_a_seeded_shuffle_of_each_epoch():
    """The cached epoch orders give the same batches as shuffling the epoch for each step: a job resumed
    mid-epoch, or scored by the baseline loop, sees the order a run without the cache saw."""
    import random

    def reference(job_seed, step, batch_size, num_examples):
        out, position = [], step * batch_size
        while len(out) < batch_size:
            epoch, offset = divmod(position, num_examples)
            order = list(range(num_examples))
            random.Random(f"zoserve-epoch:{job_seed}:{epoch}").shuffle(order)
            take = min(batch_size - len(out), num_examples - offset)
            out += order[offset : offset + take]
            position += take
        return out

    for seed, batch_size, num_examples in ((0, 16, 67), (7, 5, 12), (3, 32, 20)):
        for step in range(12):
            assert batch_indices(seed, step, batch_size, num_examples) == reference(seed, step, batch_size, num_examples)
    batch = batch_indices(1, 0, 4, 10)
    batch.append(99)  # a caller's list is its own: the cached order is untouched
    assert batch_indices(1, 0, 4, 10) == reference(1, 0, 4, 10)
