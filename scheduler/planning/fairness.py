"""Weighted fair sharing of scoring tokens across training jobs.

Start-time fair queueing over tokens, the virtual-time form of deficit round robin: each job carries a
virtual start tag = tokens granted to it / its weight, offset from where it joined. The job with the
smallest tag goes next. DRR's quantum = weight becomes "a token costs 1/weight virtual time", which handles
steps of very different sizes (B x 2q x sequence length varies 100x across jobs) without tuning a quantum,
and gives the same long-run shares with lag bounded by one step per job.

Why not plain DRR rounds: a ZO job has at most one step outstanding (step N+1 perturbs version N+1), so a
job is rarely "backlogged" in DRR's sense and DRR would reset its deficit every time its step is in flight.
Tags keep that history instead.

- Virtual time is the largest start tag granted so far (SFQ: the start tag of the work in service).
- A new or resumed job joins at the current virtual time, so it cannot claim credit for time it was away
  and does not owe anything either.
- **Shares are enforced, not just ordered.** A ZO job has at most one step in flight, so when the token
  budget has room, ordering grants changes nothing: two latency-bound jobs would each run back to back and
  split the engine 50/50 whatever their weights. So a ready job may start a step only while its tag is no
  more than `max_lead` ahead of the smallest tag of the *active* jobs (ready, stepping, or between two steps
  for at most `idle_grace_s`). A 1:2 pair then runs 1:2 steps. The job with the smallest tag is always
  eligible, so nobody deadlocks or starves.
- A job idle for longer than the grace (evaluating, waiting for data) stops holding the others back and
  re-enters at max(its tag, virtual time): it banks no credit for the time it did not ask for work.
- A paused or removed job is dropped at once: its share goes to the others from the next grant on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from scheduler.planning.records import JobDemand, PlanningError, require, require_count


@dataclass(frozen=True)
class JobFairState:
    job_id: str
    virtual_start: float  # tokens granted / weight, offset to the virtual time at which the job joined
    num_tokens_granted_total: int = 0
    recent_tokens: float = 0.0  # EWMA of tokens granted per round, for the share record


@dataclass(frozen=True)
class FairnessState:
    jobs: tuple[JobFairState, ...] = ()  # sorted by job_id
    virtual_time: float = 0.0  # largest start tag granted so far; never decreases

    def by_job(self) -> dict[str, JobFairState]:
        return {job.job_id: job for job in self.jobs}


def _freeze(jobs: Iterable[JobFairState], virtual_time: float) -> FairnessState:
    return FairnessState(jobs=tuple(sorted(jobs, key=lambda job: job.job_id)), virtual_time=virtual_time)


def is_active(demand: JobDemand, idle_grace_s: float) -> bool:
    """Counts for fairness: ready, stepping, or between steps for at most the grace."""
    if demand.is_paused:
        return False
    return demand.wants_step or demand.has_step_in_flight or demand.idle_s <= idle_grace_s


def sync_jobs(state: FairnessState, demands: Iterable[JobDemand], idle_grace_s: float) -> FairnessState:
    """Admit new and resumed jobs, re-enter long-idle ones, drop paused and vanished ones."""
    known = state.by_job()
    virtual_time = state.virtual_time
    synced = []
    for demand in demands:
        if demand.is_paused:
            continue
        job = known.get(demand.job_id)
        if job is None:
            job = JobFairState(job_id=demand.job_id, virtual_start=virtual_time)
        elif not is_active(demand, idle_grace_s):
            job = replace(job, virtual_start=max(job.virtual_start, virtual_time))
        synced.append(job)
    return _freeze(synced, virtual_time)


def fair_order(
    state: FairnessState, demands: Iterable[JobDemand], idle_grace_s: float, max_lead: float = 0.0
) -> tuple[tuple[JobDemand, ...], tuple[JobDemand, ...]]:
    """(eligible, ahead): ready jobs within `max_lead` of the smallest active tag, most owed first; and the
    ready jobs that are ahead of their share and must wait."""
    require(max_lead >= 0.0, "max_lead", f"must be >= 0, got {max_lead}")
    demands = tuple(demands)
    tags = state.by_job()
    for demand in demands:
        if not demand.is_paused and demand.job_id not in tags:
            raise PlanningError(f"job_id: {demand.job_id!r} is not in the fairness state; call sync_jobs first")
    active = [tags[d.job_id].virtual_start for d in demands if is_active(d, idle_grace_s)]
    floor = min(active) if active else 0.0
    ready = sorted(
        (d for d in demands if d.is_ready), key=lambda d: (tags[d.job_id].virtual_start, d.job_id)
    )
    limit = floor + max_lead + 1e-9 * max(1.0, abs(floor))  # equal tags summed in another order still tie
    eligible = tuple(d for d in ready if tags[d.job_id].virtual_start <= limit)
    ahead = tuple(d for d in ready if tags[d.job_id].virtual_start > limit)
    return eligible, ahead


def charge(state: FairnessState, job_id: str, num_tokens: int, weight: float) -> FairnessState:
    """Account a granted step. Charged at grant time, like a start tag: the job pays before it runs."""
    require_count(num_tokens, "num_tokens")
    require(weight > 0, "weight", f"must be > 0, got {weight}")
    jobs = state.by_job()
    if job_id not in jobs:
        raise PlanningError(f"job_id: {job_id!r} is not in the fairness state")
    job = jobs[job_id]
    jobs[job_id] = replace(
        job,
        virtual_start=job.virtual_start + num_tokens / weight,
        num_tokens_granted_total=job.num_tokens_granted_total + num_tokens,
    )
    return _freeze(jobs.values(), max(state.virtual_time, job.virtual_start))


def refund(state: FairnessState, job_id: str, num_tokens: int, weight: float) -> FairnessState:
    """Undo a charge for a granted step that was never submitted (engine error, job cancelled)."""
    require_count(num_tokens, "num_tokens")
    require(weight > 0, "weight", f"must be > 0, got {weight}")
    jobs = state.by_job()
    if job_id not in jobs:
        return state  # already dropped (paused / removed): nothing to give back
    job = jobs[job_id]
    jobs[job_id] = replace(
        job,
        virtual_start=job.virtual_start - num_tokens / weight,
        num_tokens_granted_total=max(0, job.num_tokens_granted_total - num_tokens),
    )
    return _freeze(jobs.values(), state.virtual_time)


def close_round(state: FairnessState, granted_tokens: Mapping[str, int], decay: float) -> FairnessState:
    """Fold this round's grants into each job's recent-tokens EWMA (visibility only, not policy)."""
    require(0.0 <= decay < 1.0, "decay", f"must be in [0, 1), got {decay}")
    jobs = [
        replace(job, recent_tokens=decay * job.recent_tokens + (1.0 - decay) * granted_tokens.get(job.job_id, 0))
        for job in state.jobs
    ]
    return _freeze(jobs, state.virtual_time)


def recent_shares(state: FairnessState) -> dict[str, float]:
    total = sum(job.recent_tokens for job in state.jobs)
    return {job.job_id: (job.recent_tokens / total if total > 0 else 0.0) for job in state.jobs}
