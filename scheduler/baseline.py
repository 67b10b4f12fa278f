"""The conventional MeZO loop over transformers + PEFT: the parity oracle and the performance baseline.

It runs the way MeZO's official trainer does: perturb the trainable parameters in place (+ε z), forward,
move to −ε z, forward, restore, then update from the regenerated z; each forward is one padded batch.
To be a fair baseline rather than a strawman it computes log-probs only where the objective needs them
(the LM head runs on the gathered hidden states, not on every position) and uses every CPU thread.
It shares the seeds, minibatch order, scoring sequences, loss reduction and update arithmetic with the
engine path, so the two differ only in the forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scheduler.objectives import EncodedDataset
from scheduler.sampling import batch_indices
from scheduler.scoring import ScoringSequence, SequenceScores
from scheduler.zo import mezo
from scheduler.zo.directions import derive_seeds, stream_directions
from scheduler.zo.lora_layout import LoraLayout
from scheduler.engine_step import StepOutcome

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BaselineConfig:
    model: str
    dtype: str = "float32"
    num_threads: int | None = None  # None: torch's default (every core)


class BaselineMezoTrainer:
    def __init__(self, config: BaselineConfig, layout: LoraLayout, theta0: dict[str, torch.Tensor]):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.layout = layout
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        base = AutoModelForCausalLM.from_pretrained(config.model, dtype=_DTYPES[config.dtype])
        shape = layout.shape
        peft_config = LoraConfig(
            r=shape.rank,
            lora_alpha=shape.alpha,
            target_modules=list(shape.target_modules),
            lora_dropout=0.0,
            init_lora_weights=False,
        )
        self.model = get_peft_model(base, peft_config).eval()
        params = dict(self.model.named_parameters())
        # θ views onto the PEFT parameters, keyed by the canonical (adapter-name-free) PEFT names.
        self.theta: dict[str, torch.Tensor] = {}
        for spec in layout.tensors:
            peft_name = spec.name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight"
            )
            param = params[peft_name]
            param.requires_grad_(False)
            param.data.copy_(theta0[spec.name])
            self.theta[spec.name] = param.data
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ----------------------------------------------------------------- forward
    @torch.inference_mode()
    def score(self, sequences: Sequence[ScoringSequence]) -> list[SequenceScores]:
        """One right-padded forward over all sequences; LM head only at the positions that are read."""
        lengths = [len(s.token_ids) for s in sequences]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)  # [N, L]
        mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [N, L]
        for row, seq in enumerate(sequences):
            ids[row, : len(seq.token_ids)] = torch.tensor(seq.token_ids)
            mask[row, : len(seq.token_ids)] = 1
        decoder = self.model.get_base_model().model
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [N, L, H]
        lm_head = self.model.get_base_model().lm_head
        rows, positions = [], []
        for row, seq in enumerate(sequences):
            if seq.candidate_ids:
                rows.append(row)
                positions.append(lengths[row] - 1)
            else:
                for target in range(seq.target_start, lengths[row]):
                    rows.append(row)
                    positions.append(target - 1)
        picked = hidden[torch.tensor(rows), torch.tensor(positions)]  # [P, H]
        logprobs = torch.log_softmax(lm_head(picked).float(), dim=-1)  # [P, V]
        results, cursor = [], 0
        for seq in sequences:
            if seq.candidate_ids:
                results.append(SequenceScores(tuple(logprobs[cursor, list(seq.candidate_ids)].tolist())))
                cursor += 1
            else:
                targets = seq.token_ids[seq.target_start :]
                block = logprobs[cursor : cursor + len(targets)]
                results.append(SequenceScores(tuple(block[torch.arange(len(targets)), list(targets)].tolist())))
                cursor += len(targets)
        return results

    # ----------------------------------------------------------------- MeZO
    def _perturb(self, seed: int, scale: float) -> None:
        for spec, (z,) in stream_directions(self.layout, [seed]):
            param = self.theta[spec.name]
            param.add_(z.to(param.dtype), alpha=scale)

    def step(
        self, data: EncodedDataset, hyper: mezo.MezoHyper, *, job_seed: int, step: int, batch_size: int
    ) -> StepOutcome:
        started = time.perf_counter()
        batch = batch_indices(job_seed, step, batch_size, len(data))
        seeds = derive_seeds(job_seed, step, hyper.num_directions)
        sequences = data.sequences(batch)
        losses_plus, losses_minus = [], []
        for seed in seeds:
            self._perturb(seed, +hyper.eps)
            losses_plus.append(data.score_batch(batch, self.score(sequences)).loss)
            self._perturb(seed, -2 * hyper.eps)
            losses_minus.append(data.score_batch(batch, self.score(sequences)).loss)
            self._perturb(seed, +hyper.eps)
        grads = mezo.projected_gradients(losses_plus, losses_minus, hyper.eps)
        coeffs = mezo.update_coefficients(grads)
        mezo.apply_update(self.theta, self.layout, seeds, coeffs, hyper.lr, hyper.weight_decay)
        q = hyper.num_directions
        losses = tuple(x for pair in zip(losses_plus, losses_minus) for x in pair)  # engine probe order
        return StepOutcome(
            step=step,
            seeds=tuple(seeds),
            batch=tuple(batch),
            losses=losses,
            loss=sum(losses) / len(losses),
            projected_grads=tuple(grads),
            coeffs=tuple(coeffs),
            lr=hyper.lr,
            num_sequences=2 * q * len(sequences),
            num_tokens=2 * q * sum(len(s.token_ids) for s in sequences),
            duration_s=time.perf_counter() - started,
        )

    def state(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().float().clone() for name, t in self.theta.items()}
