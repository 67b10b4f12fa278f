"""The conventional ZO loops over transformers + PEFT: the parity oracle and the performance baseline.

`BaselineMezoTrainer` runs the way MeZO's official trainer does: perturb the trainable parameters in place
(+ε z), forward, move to −ε z, forward, restore, then update from the regenerated z; each forward is one padded
batch. `BaselineZoTrainer` runs any method of `scheduler.zo.methods` through the same step protocol the engine
step loop runs (`next_probes` → score each probe state → `finish_step` → `apply_record`), and
`FirstOrderLoraTrainer` is ordinary backprop on the same LoRA parameters (the ceiling a ZO method is measured
against). To be a fair baseline rather than a strawman the forward computes log-probs only where the
objective needs them (the LM head runs on the gathered hidden states, not on every position) and uses every
CPU thread. All three share the seeds, minibatch order, scoring sequences and loss reduction with the engine
path (and the ZO loops its update arithmetic), so they differ from it only in the forward pass. The two ZO
loops also take the reward objective's data: each probe state then greedy-generates one unpadded sequence per
example (`scheduler.baseline_reward`, vLLM's decoding rules) and `EncodedReward.reward_batch` gives the loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scheduler.baseline_reward import eos_token_ids, greedy_generations
from scheduler.engine_step import StepOutcome, step_outcome
from scheduler.objectives import BatchScore, EncodedClassification, EncodedDataset
from scheduler.rewards import EncodedReward
from scheduler.sampling import batch_indices
from scheduler.scoring import ScoringSequence, SequenceScores
from scheduler.zo import mezo
from scheduler.zo.directions import derive_seeds, stream_directions
from scheduler.zo.lora_layout import LoraLayout
from scheduler.zo.zo_step import (
    Probe,
    StepSeeds,
    TrainState,
    ZoMethod,
    apply_record,
    finish_step,
    init_state,
    materialise_probes,
    next_probes,
    step_base,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BaselineConfig:
    model: str
    dtype: str = "float32"
    num_threads: int | None = None  # None: torch's default (every core)


def _peft_param_name(name: str) -> str:
    """Canonical PEFT state-dict name → the live parameter name under the "default" adapter."""
    return name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


class PeftLora:
    """A transformers model with a PEFT LoRA adapter whose tensors are addressed by canonical PEFT names."""

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
        named = dict(self.model.named_parameters())
        self.params: dict[str, torch.nn.Parameter] = {}
        for spec in layout.tensors:
            param = named[_peft_param_name(spec.name)]
            param.requires_grad_(False)
            param.data.copy_(theta0[spec.name])
            self.params[spec.name] = param
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)

    def load(self, theta: dict[str, torch.Tensor]) -> None:
        """Copy a whole adapter state into the PEFT parameters (exact: no arithmetic)."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(theta[name])

    def read(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().clone() for name, p in self.params.items()}

    def position_logprobs(self, sequences: Sequence[ScoringSequence]) -> torch.Tensor:
        """Log-probs [P, V] at every position some sequence reads, in `score`'s order; differentiable.

        One right-padded forward over all sequences; the LM head runs only on the P gathered positions.
        """
        lengths = [len(s.token_ids) for s in sequences]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)  # [N, L]
        mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [N, L]
        for row, seq in enumerate(sequences):
            ids[row, : len(seq.token_ids)] = torch.tensor(seq.token_ids)
            mask[row, : len(seq.token_ids)] = 1
        base = self.model.get_base_model()
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [N, L, H]
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
        return torch.log_softmax(base.lm_head(picked).float(), dim=-1)  # [P, V]

    @torch.inference_mode()
    def score(self, sequences: Sequence[ScoringSequence]) -> list[SequenceScores]:
        logprobs = self.position_logprobs(sequences)  # [P, V]
        results, cursor = [], 0
        for seq in sequences:
            if seq.candidate_ids:
                results.append(SequenceScores(tuple(logprobs[cursor, list(seq.candidate_ids)].tolist())))
                cursor += 1
            else:
                targets = seq.token_ids[seq.target_start :]
                block = logprobs[cursor : cursor + len(targets)]  # [T, V]
                results.append(SequenceScores(tuple(block[torch.arange(len(targets)), list(targets)].tolist())))
                cursor += len(targets)
        return results

    def generate(self, data: EncodedReward, indices: Sequence[int]) -> list[str]:
        """The greedy generation for each example of `indices`, as the engine's `greedy_generations` returns it."""
        return greedy_generations(self.model, self.tokenizer.backend_tokenizer, data, indices, self.eos_ids)

    def batch_score(
        self, data: EncodedDataset | EncodedReward, indices: Sequence[int], sequences: Sequence[ScoringSequence]
    ) -> BatchScore:
        """The minibatch under the current parameters: scored, or generated and matched (`probe_batch_score`)."""
        if isinstance(data, EncodedReward):
            return data.reward_batch(indices, self.generate(data, indices))
        return data.score_batch(indices, self.score(sequences))


# ----------------------------------------------------------------------------------------------- MeZO
class BaselineMezoTrainer:
    """MeZO-SGD exactly as its official trainer runs it: θ lives in the PEFT parameters, perturbed in place."""

    def __init__(self, config: BaselineConfig, layout: LoraLayout, theta0: dict[str, torch.Tensor]):
        self.lora = PeftLora(config, layout, theta0)
        self.layout = layout
        self.tokenizer = self.lora.tokenizer
        self.model = self.lora.model
        # θ views onto the PEFT parameters, keyed by the canonical (adapter-name-free) PEFT names.
        self.theta: dict[str, torch.Tensor] = {name: p.data for name, p in self.lora.params.items()}

    def score(self, sequences: Sequence[ScoringSequence]) -> list[SequenceScores]:
        return self.lora.score(sequences)

    def _perturb(self, seed: int, scale: float) -> None:
        for spec, (z,) in stream_directions(self.layout, [seed]):
            param = self.theta[spec.name]
            param.add_(z.to(param.dtype), alpha=scale)

    def step(
        self, data: EncodedDataset | EncodedReward, hyper: mezo.MezoHyper, *, job_seed: int, step: int, batch_size: int
    ) -> StepOutcome:
        started = time.perf_counter()
        batch = batch_indices(job_seed, step, batch_size, len(data))
        seeds = derive_seeds(job_seed, step, hyper.num_directions)
        sequences = data.sequences(batch)
        losses_plus, losses_minus = [], []
        for seed in seeds:
            self._perturb(seed, +hyper.eps)
            losses_plus.append(self.lora.batch_score(data, batch, sequences).loss)
            self._perturb(seed, -2 * hyper.eps)
            losses_minus.append(self.lora.batch_score(data, batch, sequences).loss)
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


# ------------------------------------------------------------------------------------------ any method
def _two_point(probe: Probe) -> tuple[int, float] | None:
    """(direction index, scale) when the probe is θ + scale·dᵢ, else None."""
    if probe.theta_scale == 1.0 and len(probe.terms) == 1:
        return probe.terms[0]
    return None


class BaselineZoTrainer:
    """Any registered ZO method over transformers + PEFT, through the engine's step protocol.

    θ and the optimiser buffers live in the trainer's own fp32 `TrainState`, which `apply_record` updates
    exactly as the engine worker and store replay do; the PEFT parameters only ever hold θ or a probe.
    A probe θ ± ε·ρᵢ·dᵢ is made MeZO's way, by adding ±ε·ρᵢ·dᵢ to the parameters in place; afterwards they
    are restored by copying θ back, never by subtracting (not exact in floating point). Probe states of
    any other form (ZO-SGD-Cons' θ and its candidates θ ∓ lr·ĝ) are materialised with `materialise_probes`
    and loaded into the PEFT parameters by copy.
    """

    def __init__(
        self, config: BaselineConfig, layout: LoraLayout, theta0: dict[str, torch.Tensor], method: ZoMethod
    ):
        self.lora = PeftLora(config, layout, theta0)
        self.layout = layout
        self.tokenizer = self.lora.tokenizer
        self.method = method
        self.train_state: TrainState = init_state(method, layout, theta0)

    def _round_losses(
        self, data: EncodedDataset | EncodedReward, batch: list[int], seeds: StepSeeds, probes: Sequence[Probe]
    ) -> tuple[float, ...]:
        sequences = data.sequences(batch)
        theta = self.train_state.theta
        losses = []
        if all(_two_point(p) is not None for p in probes):
            base = step_base(self.method.perturbation, theta, self.layout, seeds)  # lozo-bank: a window entered
            if base is not theta:
                self.lora.load(base)
            # The round's directions, regenerated once: q θ-sized tensors, small for a LoRA adapter.
            directions = {spec.name: ds for spec, ds in self.method.perturbation.stream(self.layout, seeds)}
            for probe in probes:
                index, scale = _two_point(probe)
                with torch.no_grad():
                    for name, param in self.lora.params.items():
                        param.add_(directions[name][index].to(param.dtype), alpha=scale)
                losses.append(self.lora.batch_score(data, batch, sequences).loss)
                self.lora.load(base)
        else:
            for state in materialise_probes(theta, self.layout, self.method.perturbation, seeds, probes):
                self.lora.load(state)
                losses.append(self.lora.batch_score(data, batch, sequences).loss)
            self.lora.load(theta)
        return tuple(losses)

    def step(
        self, data: EncodedDataset | EncodedReward, lr: float, *, job_seed: int, step: int, batch_size: int
    ) -> StepOutcome:
        started = time.perf_counter()
        method = self.method
        batch = batch_indices(job_seed, step, batch_size, len(data))
        seeds = method.perturbation.seeds_for_step(job_seed, step, method.num_directions)
        losses: tuple[float, ...] = ()
        num_sequences = 0
        while (probes := next_probes(method, seeds, losses, lr)) is not None:
            losses += self._round_losses(data, batch, seeds, probes)
            num_sequences += len(probes) * len(data.sequences(batch))
        record = finish_step(method, seeds, losses, lr)
        apply_record(method, self.train_state, self.layout, record)
        self.lora.load(self.train_state.theta)
        return step_outcome(
            method, step=step, seeds=seeds, batch=batch, data=data, sequences=data.sequences(batch),
            losses=losses, record=record, num_sequences=num_sequences, started=started,
        )

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(θ, buffers), copies: the pair `EngineBinding.get_state` returns."""
        clone = self.train_state.clone()
        return clone.theta, clone.buffers


# ------------------------------------------------------------------------------------- first order
@dataclass(frozen=True)
class FirstOrderStep:
    step: int
    loss: float
    num_correct: int
    num_examples: int
    duration_s: float


class FirstOrderLoraTrainer:
    """Backprop LoRA fine-tuning (AdamW) on the classification loss: the ceiling for the ZO methods.

    Same LoRA layout, initial state, minibatch order and loss as the ZO loops; single-token options only
    (the class logits are the candidates' log-probs at the last position, as in the engine's cheap path).
    """

    def __init__(
        self,
        config: BaselineConfig,
        layout: LoraLayout,
        theta0: dict[str, torch.Tensor],
        *,
        lr: float,
        weight_decay: float = 0.0,
    ):
        self.lora = PeftLora(config, layout, theta0)
        self.tokenizer = self.lora.tokenizer
        params = list(self.lora.params.values())
        for param in params:
            param.requires_grad_(True)
        self.optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step(self, data: EncodedClassification, *, job_seed: int, step: int, batch_size: int) -> FirstOrderStep:
        if not data.single_token_options:
            raise ValueError("FirstOrderLoraTrainer needs single-token options")
        started = time.perf_counter()
        batch = batch_indices(job_seed, step, batch_size, len(data))
        candidates = [o[0] for o in data.option_ids]
        logprobs = self.lora.position_logprobs(data.sequences(batch))  # [B, V]
        logits = logprobs[:, candidates]  # [B, C]
        labels = torch.tensor([data.labels[i] for i in batch])  # [B]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        num_correct = int((logits.argmax(dim=-1) == labels).sum())
        return FirstOrderStep(step, float(loss), num_correct, len(batch), time.perf_counter() - started)

    def state(self) -> dict[str, torch.Tensor]:
        return self.lora.read()
