"""The reward objective's generation on the transformers baseline: greedy decoding with vLLM's output rules.

The engine path generates with `SamplingParams(temperature=0, max_tokens=max_new_tokens, stop=...)` and the
baseline must produce the same text from the same tokens, so this module follows vLLM's rules one by one:
- greedy: the next token is the argmax of the last position's logits (ties: the lowest id, as torch's argmax);
- at most `max_new_tokens` tokens, an EOS token among them; generation ends on EOS and the EOS token is not
  detokenized;
- text comes from a `tokenizers` `DecodeStream` primed with the prompt ids, skipping special tokens (what
  vLLM's fast incremental detokenizer does), so a generation's first word boundary is decided the same way;
- after each token the stop strings are searched in the text the token completed; the earliest-ending one
  wins (ties: stop-list order) and the text is cut before it (`include_stop_str_in_output` is False).
The match rule and the loss stay in `scheduler.rewards` (`EncodedReward.reward_batch`), shared with the engine.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from scheduler.rewards import EncodedReward


def stop_cut(text: str, num_new_chars: int, stop: Sequence[str]) -> int | None:
    """Where to cut `text` when a stop string ends in its last `num_new_chars` characters, else None.

    vLLM's `check_stop_strings` with the stop string excluded: among the stop strings found starting at most
    len(stop) − 1 characters before the new text, the one that ends earliest (then the first listed).
    """
    if not num_new_chars:
        return None
    best_index, best_end = None, None
    for stop_str in stop:
        index = text.find(stop_str, max(0, len(text) + 1 - num_new_chars - len(stop_str)))
        if index != -1 and (best_end is None or index + len(stop_str) < best_end):
            best_index, best_end = index, index + len(stop_str)
    return best_index


@torch.inference_mode()
def greedy_text(
    model,
    backend,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    stop: Sequence[str],
    eos_ids: Collection[int],
) -> str:
    """The text vLLM returns for a greedy request on `prompt_ids`; `backend` is a `tokenizers.Tokenizer`.

    One unpadded sequence with a KV cache: padding would change the forward's arithmetic, and near-tied
    logits are exactly where a reward flips.
    """
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
    text = ""
    inputs = torch.tensor([list(prompt_ids)])  # [1, L]
    past = None
    for _ in range(max_new_tokens):
        out = model(input_ids=inputs, past_key_values=past, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        if token in eos_ids:
            break
        piece = stream.step(backend, token) or ""  # None while a multi-byte character is incomplete
        text += piece
        cut = stop_cut(text, len(piece), stop)
        if cut is not None:
            return text[:cut]
        past = out.past_key_values
        inputs = torch.tensor([[token]])  # [1, 1]
    return text


def greedy_generations(
    model, backend, data: EncodedReward, indices: Sequence[int], eos_ids: Collection[int]
) -> list[str]:
    """The greedy generation of each example of `indices` under the model's current parameters, in order."""
    return [
        greedy_text(
            model, backend, data.prompts[i], max_new_tokens=data.max_new_tokens, stop=data.stop, eos_ids=eos_ids
        )
        for i in indices
    ]


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """The ids that end a vLLM request: the tokenizer's EOS and the generation config's EOS id(s)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return frozenset(ids)
