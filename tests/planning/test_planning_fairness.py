import math

from hypothesis import example, given, settings
from hypothesis import strategies as st
from planning_harness import Harness, Job, fixed_budget

from scheduler.planning import ControllerConfig, JobStatus, LatencySignal, PlannerConfig


WAITING = {
    JobStatus.WAITING_FOR_TOKENS,
    JobStatus.STEP_EXCEEDS_BUDGET,
    JobStatus.WAITING_FOR_SLOTS,
    JobStatus.BEHIND_BLOCKED_JOB,
}


def longest_wait(statuses):
    longest = current = 0
    for status in statuses:
        current = current + 1 if status in WAITING else 0
        longest = max(longest, current)
    return longest


def shares(granted, job_ids):
    total = sum(granted.get(job_id, 0) for job_id in job_ids)
    return [granted.get(job_id, 0) / total for job_id in job_ids]


def test_weights_one_to_two_with_different_step_sizes_converge():
    for small_step, big_step in [(1000, 3000), (3000, 700), (1500, 1500)]:
        jobs = [Job("light", 1.0, big_step), Job("heavy", 2.0, small_step)]
        harness = Harness(fixed_budget(max(small_step, big_step)))
        for _ in range(1500):
            harness.round(jobs)
        light, heavy = shares(harness.granted, ["light", "heavy"])
        assert abs(light - 1 / 3) < 0.05 and abs(heavy - 2 / 3) < 0.05, (small_step, big_step, light)


@settings(max_examples=15, deadline=None, database=None)
@given(
    st.sampled_from([(1.0, 2.0), (1.0, 3.0), (2.0, 3.0)]),
    st.integers(200, 4000),
    st.integers(200, 4000),
)
def test_weighted_shares_converge_for_any_step_sizes(weights, step_a, step_b):
    jobs = [Job("a", weights[0], step_a), Job("b", weights[1], step_b)]
    harness = Harness(fixed_budget(max(step_a, step_b)))
    for _ in range(1200):
        harness.round(jobs)
    share_a, _ = shares(harness.granted, ["a", "b"])
    assert abs(share_a - weights[0] / sum(weights)) < 0.05


def test_paused_job_releases_its_share_at_once_and_banks_no_credit():
    jobs = [Job("a", 1.0, 1000), Job("b", 1.0, 1000), Job("c", 1.0, 1000)]
    harness = Harness(fixed_budget(1000))
    for _ in range(300):
        harness.round(jobs)
    assert all(abs(share - 1 / 3) < 0.02 for share in shares(harness.granted, ["a", "b", "c"]))

    before = dict(harness.granted)
    plan = harness.round(jobs, paused={"c"})
    assert "c" not in {job.job_id for job in plan.next_state.fairness.jobs}
    assert {job.job_id: job.status for job in plan.record.jobs}["c"] is JobStatus.PAUSED
    for _ in range(299):
        harness.round(jobs, paused={"c"})
    during = {job_id: harness.granted.get(job_id, 0) - before.get(job_id, 0) for job_id in "abc"}
    assert during["c"] == 0 and abs(during["a"] - during["b"]) <= 1000

    before = dict(harness.granted)
    log_start = len(harness.grants_log)
    for _ in range(30):
        harness.round(jobs)
    resumed = [job_id for grants in harness.grants_log[log_start:] for job_id in grants]
    assert 8 <= resumed.count("c") <= 12  # a third, not a catch-up burst for the time it was away


@settings(max_examples=40, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.floats(0.1, 10.0), st.integers(100, 5000), st.integers(1, 4)),
        min_size=2,
        max_size=5,
    ),
    st.floats(0.5, 2.0),
    st.integers(300, 3000),
)
# A job capped by its own step latency (one step in flight) once banked credit and then locked the others out.
@example(specs=[(1.0, 100, 1), (2.0, 100, 1), (0.5, 803, 1)], budget_scale=1.0, rate=300)
def test_no_job_starves(specs, budget_scale, rate):
    jobs = [Job(f"j{i}", weight, step, slots) for i, (weight, step, slots) in enumerate(specs)]
    max_step = max(step for _, step, _ in specs)
    budget = max(1, int(max_step * budget_scale))  # some steps may exceed the budget, none exceeds the max
    controller = ControllerConfig(
        target_ttft_ms=100.0, max_tokens_in_flight=2 * max_step, min_tokens_in_flight=1, initial_tokens_in_flight=budget
    )
    # Users present with p95 inside the hysteresis band: the controller holds the budget where it is.
    in_band = LatencySignal(ttft_p95_ms=90.0, num_user_running=2)
    harness = Harness(PlannerConfig(controller=controller, num_slots=8), tokens_per_round_per_step=rate)
    for _ in range(400):
        harness.round(jobs, latency=in_band)
    assert {plan.next_state.controller.budget_tokens for plan in harness.plans} == {budget}
    # Weighted, not equal: a job with a big step and a small weight may run rarely. No starvation means its
    # longest wait is bounded: while it waits, another job j gets at most the grants that close their
    # virtual-time gap (its step cost / j's step cost, plus one), each lasting j's step duration.
    rounds_in_flight = {job.job_id: math.ceil(job.num_step_tokens / rate) for job in jobs}
    for job in jobs:
        cost = job.num_step_tokens / job.weight
        bound = 2 + max(rounds_in_flight.values()) + sum(
            (math.ceil(cost / (other.num_step_tokens / other.weight)) + 1) * (rounds_in_flight[other.job_id] + 1)
            for other in jobs
            if other is not job
        )
        statuses = [{r.job_id: r.status for r in plan.record.jobs}[job.job_id] for plan in harness.plans]
        assert longest_wait(statuses) <= bound, (job.job_id, bound)
        assert JobStatus.GRANTED in statuses
    # Everything granted fits the budget, except an oversize step admitted alone.
    for plan in harness.plans:
        if plan.step_grants:
            in_flight_after = plan.num_tokens_admitted + plan.record.num_probe_tokens_in_flight
            alone = len(plan.step_grants) == 1 and plan.record.num_probe_tokens_in_flight == 0
            assert in_flight_after <= budget or alone
