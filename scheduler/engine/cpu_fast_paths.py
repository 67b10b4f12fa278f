"""Two of vLLM's per-step CPU paths, vectorised: each costs a fixed slice of every forward users wait on.

Profiles of the engine core next to ZO work (bench/engine_mix.py, py-spy) put a few of vLLM's Python loops
per step, each over every token or every request of the step, among the larger costs outside the model itself.
Two are plain data shuffling with an obvious vectorised form:

- **LoRA mapping** (`vllm.lora.punica_wrapper.utils.convert_mapping`, called from
  `PunicaWrapperBase._update_base_metadata` whenever a step's token -> adapter mapping changes, which next to ZO
  work is every step): a Python loop over every token of the step, then tensors built from lists. Here: one
  lookup table over the slot ids and numpy indexing.
- **Log-probs of chosen token ids** (`Sampler.gather_specific_token_logprobs`, every step that holds a scoring
  request: each ZO probe asks for its candidate ids' log-probs): three torch ops per request to build a padded
  id matrix, and a torch.compile'd one-line count. Here: the matrix is filled in numpy and wrapped once, the
  count runs eagerly; the gathers are vLLM's own.

Each replacement is installed only on the CPU platform, and only after it has returned exactly what vLLM's
own function returns on random inputs (`_mapping_agrees`, `_logprobs_agree`); otherwise vLLM's stays. `installed()` says which
are in place (the engine reports it; tests/engine assert it in both process layouts).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from vllm.v1.outputs import LogprobsTensors

log = logging.getLogger(__name__)

LORA_MAPPING = "lora_mapping"
LOGPROB_TOKEN_IDS = "logprob_token_ids"


# --- LoRA mapping -------------------------------------------------------------------------------------------


def convert_mapping(mapping, lora_index_to_id, max_loras: int, vocab_size: int, device):
    """What vLLM's `convert_mapping` returns (base, sampler, padded sampler and embedding indices, and their
    lengths), without a Python loop over the tokens. An adapter id missing from `lora_index_to_id` raises
    KeyError, as vLLM's does."""
    slot_of = {lora_id: index for index, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    token_ids = np.asarray(mapping.index_mapping, dtype=np.int64)
    prompt_ids = np.asarray(mapping.prompt_mapping, dtype=np.int64)
    lookup = np.full(max(slot_of, default=0) + 1, -1, dtype=np.int64)
    for lora_id, index in slot_of.items():
        if lora_id >= 0:
            lookup[lora_id] = index
    token_slots = _slots(token_ids, lookup)
    prompt_slots = _slots(prompt_ids, lookup)
    base = torch.from_numpy(token_slots)
    embeddings = torch.from_numpy(np.where(token_ids > 0, token_slots, 0) * vocab_size)
    sampler = torch.from_numpy(prompt_slots)
    num_prompts = len(prompt_slots)
    padded = torch.from_numpy(
        np.arange(num_prompts, dtype=np.int64) + np.where(prompt_slots == -1, max_loras - 1, prompt_slots) * num_prompts
    )
    if torch.device(device).type != "cpu":
        base, sampler, padded, embeddings = (t.to(device, non_blocking=True) for t in (base, sampler, padded, embeddings))
    return base, sampler, padded, embeddings, [base.shape[-1], sampler.shape[-1], padded.shape[-1], embeddings.shape[-1]]


def _slots(ids: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Slot index of each positive id, -1 for ids <= 0; KeyError for a positive id that holds no slot."""
    positive = ids > 0
    in_table = positive & (ids < len(lookup))
    slots = np.full(ids.shape, -1, dtype=np.int64)
    slots[in_table] = lookup[ids[in_table]]
    missing = positive & ((~in_table) | (slots == -1))
    if missing.any():
        raise KeyError(int(ids[missing][0]))
    return slots


def _mapping_agrees(stock) -> bool:
    from vllm.lora.layers.utils import LoRAMapping

    rng = np.random.default_rng(0)
    slots = [None] * 9
    for index, lora_id in enumerate((4, 9, 2, 17, 5)):
        slots[index] = lora_id
    cases = [
        LoRAMapping((4, 4, 0, 9, 17, 17, 17, 5), (4, 0, 9, 17, 5), is_prefill=True),  # 0: no adapter
        LoRAMapping((2,), (2,), is_prefill=False),
        LoRAMapping((0, 0), (0, 0), is_prefill=False),
    ]
    for _ in range(4):
        requests = rng.choice([0, 4, 9, 2, 17, 5], size=int(rng.integers(1, 40)))
        tokens = np.repeat(requests, rng.integers(1, 30, size=requests.size))
        cases.append(LoRAMapping(tokens.astype(np.int32), requests.astype(np.int32), is_prefill=True))
    for mapping in cases:
        expected = stock(mapping, slots, 10, 2048, torch.device("cpu"))
        actual = convert_mapping(mapping, slots, 10, 2048, torch.device("cpu"))
        if expected[4] != actual[4] or not all(_same(e, a) for e, a in zip(expected[:4], actual[:4])):
            return False
    return True


# --- Log-probs of chosen token ids --------------------------------------------------------------------------


def gather_specific_token_logprobs(self, logprobs: torch.Tensor, logprob_token_ids: dict, sampled: torch.Tensor):
    """vLLM's `Sampler.gather_specific_token_logprobs` with the padded id matrix built in numpy, and the sampled
    token's rank counted by the same expression vLLM compiles with torch.compile (on CPU the compiled call's
    dispatch costs more than the count over a step's few rows)."""
    if not logprob_token_ids:
        return None
    width = max(len(ids) for ids in logprob_token_ids.values()) + 1
    token_ids = np.zeros((logprobs.shape[0], width), dtype=np.int64)
    valid = np.zeros((logprobs.shape[0], width), dtype=bool)
    valid[:, 0] = True  # column 0: the sampled token
    for row, ids in logprob_token_ids.items():
        token_ids[row, 1 : len(ids) + 1] = ids
        valid[row, 1 : len(ids) + 1] = True
    token_ids_tensor = torch.from_numpy(token_ids).to(logprobs.device)
    token_ids_tensor[:, 0] = sampled
    gathered = logprobs.gather(-1, token_ids_tensor).masked_fill(~torch.from_numpy(valid).to(logprobs.device), float("-inf"))
    sampled_logprobs = logprobs.gather(-1, sampled.unsqueeze(-1))
    ranks = (logprobs >= sampled_logprobs).sum(-1)  # vLLM's batched_count_greater_than, without torch.compile's call
    return LogprobsTensors(logprob_token_ids=token_ids_tensor.to(torch.int32), logprobs=gathered, selected_token_ranks=ranks)


def _logprobs_agree(sampler_cls, stock) -> bool:
    g = torch.Generator().manual_seed(0)
    sampler = sampler_cls()
    logprobs = torch.randn(6, 50, generator=g).log_softmax(-1)
    sampled = torch.randint(0, 50, (6,), generator=g)
    for wanted in ({1: [3, 7], 4: [9], 5: [0, 49, 12]}, {0: [2]}, {}):
        expected = stock(sampler, logprobs, wanted, sampled)
        actual = gather_specific_token_logprobs(sampler, logprobs, wanted, sampled)
        if expected is None or actual is None:
            if expected is not actual:
                return False
            continue
        if not all(_same(e, a) for e, a in zip(expected, actual)):
            return False
    return True


def _same(expected, actual) -> bool:
    if expected is None or actual is None:
        return expected is actual
    return isinstance(actual, torch.Tensor) and expected.dtype == actual.dtype and torch.equal(expected, actual)


# --- installing -----------------------------------------------------------------------------------------------


def _targets():
    from vllm.lora.punica_wrapper import punica_base
    from vllm.v1.sample.sampler import Sampler

    return punica_base, Sampler


_REPLACED: dict[str, object] = {}  # name -> vLLM's own function, once replaced


def vllm_originals():
    """(vLLM's `convert_mapping`, vLLM's `Sampler.gather_specific_token_logprobs`), installed or not."""
    punica_base, sampler_cls = _targets()
    return (
        _REPLACED.get(LORA_MAPPING, punica_base.convert_mapping),
        _REPLACED.get(LOGPROB_TOKEN_IDS, sampler_cls.gather_specific_token_logprobs),
    )


def installed() -> list[str]:
    """The replacements in place, in a fixed order."""
    try:
        punica_base, sampler_cls = _targets()
    except ImportError:
        return []
    on = {
        LORA_MAPPING: punica_base.convert_mapping is convert_mapping,
        LOGPROB_TOKEN_IDS: sampler_cls.gather_specific_token_logprobs is gather_specific_token_logprobs,
    }
    return [name for name, is_on in on.items() if is_on]


def _checked(check, *args) -> bool:
    """A check that raises (vLLM's function changed shape) counts as a disagreement."""
    try:
        return bool(check(*args))
    except Exception:  # noqa: BLE001 - anything vLLM's function does differently keeps vLLM's
        log.exception("checking a fast path against vLLM's own failed")
        return False


def _verified(name: str, current) -> bool:
    """`current` is the vLLM function this process already checked and replaced once (an A/B run's switch
    back): no need to check it again."""
    return _REPLACED.get(name) is current


def install() -> list[str]:
    """Install each replacement that returns what vLLM's own does (CPU platform only); the ones in place."""
    try:
        from vllm.platforms import current_platform

        punica_base, sampler_cls = _targets()
    except ImportError:
        return []
    if not current_platform.is_cpu():
        return installed()
    current = punica_base.convert_mapping
    if current is not convert_mapping:
        if _verified(LORA_MAPPING, current) or _checked(_mapping_agrees, current):
            _REPLACED[LORA_MAPPING] = current
            punica_base.convert_mapping = convert_mapping
        else:
            log.warning("vectorised LoRA mapping disagrees with vLLM's convert_mapping; keeping vLLM's")
    current = sampler_cls.gather_specific_token_logprobs
    if current is not gather_specific_token_logprobs:
        if _verified(LOGPROB_TOKEN_IDS, current) or _checked(_logprobs_agree, sampler_cls, current):
            _REPLACED[LOGPROB_TOKEN_IDS] = current
            sampler_cls.gather_specific_token_logprobs = gather_specific_token_logprobs
        else:
            log.warning("vectorised gather of chosen log-probs disagrees with vLLM's; keeping vLLM's")
    return installed()


def uninstall() -> list[str]:
    """Put vLLM's own functions back (for A/B runs, bench/engine_mix.py --ab-fast-paths); the ones still in place."""
    try:
        punica_base, sampler_cls = _targets()
    except ImportError:
        return []
    if LORA_MAPPING in _REPLACED and punica_base.convert_mapping is convert_mapping:
        punica_base.convert_mapping = _REPLACED[LORA_MAPPING]
    if LOGPROB_TOKEN_IDS in _REPLACED and sampler_cls.gather_specific_token_logprobs is gather_specific_token_logprobs:
        sampler_cls.gather_specific_token_logprobs = _REPLACED[LOGPROB_TOKEN_IDS]
    return installed()
