"""The vLLM plugin that stops shared-memory queue readers spinning: real vLLM queues, in a fresh process each
(the patch is process-wide, and vLLM applies it in its own processes the same way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scheduler.engine.vllm_plugin import BUSY_LOOP_ENV, busy_loop_override

# A writer and a reader of one vLLM MessageQueue; the reader reads one message, then waits IDLE_S for the
# next. Prints the reader thread's CPU seconds during that wait, and whether both messages arrived intact.
_PROBE = r"""
import json, threading, time
from scheduler.engine import vllm_plugin
vllm_plugin.register()
vllm_plugin.register()  # vLLM may load plugins more than once: must stay a single patch
from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

IDLE_S = 0.6
writer = MessageQueue(n_reader=1, n_local_reader=1)
handle = writer.export_handle()
out = {}

def read():
    reader = MessageQueue.create_from_handle(handle, 0)
    reader.wait_until_ready()
    out["busy_loop_s"] = reader._spin_condition.busy_loop_s
    out["first"] = reader.dequeue(timeout=10)
    cpu0 = time.thread_time()
    out["second"] = reader.dequeue(timeout=10)
    out["wait_cpu_s"] = time.thread_time() - cpu0

thread = threading.Thread(target=read)
thread.start()
writer.wait_until_ready()
writer.enqueue({"n": 1})
time.sleep(IDLE_S)
writer.enqueue({"n": 2})
thread.join(20)
print(json.dumps(out))
"""


# Ping-pong between two threads over two queues, with pauses: every wake-up path of a reader. A reader that
# sleeps on the notification alone loses one within a few hundred messages and stalls for vLLM's 5 s re-check.
_PING_PONG = r"""
import json, threading, time
from scheduler.engine import vllm_plugin
vllm_plugin.register()
from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

N = 300
ping, pong = MessageQueue(n_reader=1, n_local_reader=1), MessageQueue(n_reader=1, n_local_reader=1)
ping_handle, pong_handle = ping.export_handle(), pong.export_handle()

def echo():
    reader = MessageQueue.create_from_handle(ping_handle, 0)
    reader.wait_until_ready()
    pong.wait_until_ready()
    for _ in range(N):
        pong.enqueue(reader.dequeue(timeout=10))

thread = threading.Thread(target=echo)
thread.start()
ping.wait_until_ready()
replies = MessageQueue.create_from_handle(pong_handle, 0)
replies.wait_until_ready()
round_trips = []
for i in range(N):
    started = time.perf_counter()
    ping.enqueue(i)
    assert replies.dequeue(timeout=10) == i
    round_trips.append(time.perf_counter() - started)
    time.sleep(0.002 if i % 3 else 0.0)
thread.join(20)
print(json.dumps({"max_round_trip_s": max(round_trips)}))
"""


# An engine step as vLLM's engine core runs it, across two processes: an `execute_model` RPC (the worker busy
# ~2 ms), then a `sample_tokens` RPC (~0.2 ms), each waiting for its reply. The poll slice is stretched to
# 50 ms so that a reply left to it stands out. argv[1]: the writer's notification high-water mark.
_ENGINE_STEPS = r"""
import json, sys, time, multiprocessing as mp

STEPS, SLICE_MS = 30, 50

def setup(hwm):
    from scheduler.engine import vllm_plugin
    vllm_plugin.IDLE_POLL_MS = SLICE_MS
    vllm_plugin.NOTIFY_HWM = hwm
    vllm_plugin.register()

def busy(seconds):
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pass

def worker(request_handle, hwm, handles):
    setup(hwm)
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    requests = MessageQueue.create_from_handle(request_handle, 0)
    replies = MessageQueue(n_reader=1, n_local_reader=1)
    handles.put(replies.export_handle())
    requests.wait_until_ready()
    replies.wait_until_ready()
    while (kind := requests.dequeue(timeout=60)) != "stop":
        busy(0.002 if kind == "execute" else 0.0002)
        replies.enqueue(time.monotonic())

if __name__ == "__main__":
    hwm = int(sys.argv[1])
    setup(hwm)
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    ctx = mp.get_context("spawn")
    requests, handles = MessageQueue(n_reader=1, n_local_reader=1), ctx.Queue()
    proc = ctx.Process(target=worker, args=(requests.export_handle(), hwm, handles))
    proc.start()
    replies = MessageQueue.create_from_handle(handles.get(timeout=60), 0)
    requests.wait_until_ready()
    replies.wait_until_ready()
    late = {"execute": [], "sample": []}
    for _ in range(STEPS):
        for kind in late:
            requests.enqueue(kind)
            sent = replies.dequeue(timeout=60)
            late[kind].append(time.monotonic() - sent)
    requests.enqueue("stop")
    proc.join(30)
    print(json.dumps({k: sum(s > SLICE_MS / 2000 for s in v) for k, v in late.items()}))
"""


def _run_probe(busy_loop: str | None, script: str = _PROBE, *args: str) -> dict:
    """Runs `script` (source text, or a file path, which spawned processes need) in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != BUSY_LOOP_ENV}
    if busy_loop is not None:
        env[BUSY_LOOP_ENV] = busy_loop
    command = [script] if script.endswith(".py") else ["-c", script]
    done = subprocess.run([sys.executable, *command, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reader_sleeps_instead_of_spinning_and_still_gets_every_message():
    quiet, spinning = _run_probe("0"), _run_probe(None)  # None: vLLM's own 1 s busy loop
    for result in (quiet, spinning):
        assert result["first"] == {"n": 1} and result["second"] == {"n": 2}
    assert quiet["busy_loop_s"] == 0.0 and spinning["busy_loop_s"] == 1
    # vLLM's reader spins through the whole 0.6 s wait (a busy machine gives the spinning thread less of a
    # core: 0.25 s was seen next to a training run); ours sleeps on the socket until the write.
    assert spinning["wait_cpu_s"] > 0.15, spinning
    assert quiet["wait_cpu_s"] < 0.08, quiet  # 1 ms poll slices: ~600 wake-ups
    assert spinning["wait_cpu_s"] > 5 * quiet["wait_cpu_s"], (quiet, spinning)


def test_no_message_waits_for_a_lost_notification():
    result = _run_probe("0", _PING_PONG)
    # A lost wake-up costs at most the 1 ms poll slice; the 0.5 s bound leaves room for a loaded machine.
    assert result["max_round_trip_s"] < 0.5, result


def test_an_engine_steps_second_reply_is_not_left_to_the_poll_slice(tmp_path):
    from scheduler.engine.vllm_plugin import NOTIFY_HWM

    script = tmp_path / "engine_steps.py"
    script.write_text(_ENGINE_STEPS)
    ours, vllms = _run_probe("0", str(script), str(NOTIFY_HWM)), _run_probe("0", str(script), "1")
    # With vLLM's high-water mark of 1 the notification of a reply sent within ~1 ms of the previous one is
    # dropped: the `sample_tokens` reply of (nearly) every step waits for the reader's next look at the ring
    # (50 ms here, 1 ms in the service). Counts: replies more than half a slice late, of 30 each. How many
    # vLLM's mark drops depends on the machine: a slow one spaces the two replies past ~1 ms, where nothing is
    # dropped (20+ of 30 on a quiet host; 14 and 4 in CI runs on a host losing most of a core to steal). So
    # the control only has to show the loss at all, and more of it than ours.
    assert ours["sample"] <= 2 and ours["execute"] <= 2, ours  # a loaded machine may delay one or two
    assert vllms["sample"] >= 3 and vllms["sample"] > ours["sample"], (vllms, ours)


def test_override_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(BUSY_LOOP_ENV, raising=False)
    assert busy_loop_override() is None
    monkeypatch.setenv(BUSY_LOOP_ENV, "0.25")
    assert busy_loop_override() == 0.25
    monkeypatch.setenv(BUSY_LOOP_ENV, "-1")
    with pytest.raises(ValueError, match=BUSY_LOOP_ENV):
        busy_loop_override()


def test_engine_config_hands_the_setting_to_the_engine_processes(monkeypatch):
    from scheduler.engine.config import EngineConfig

    monkeypatch.delenv(BUSY_LOOP_ENV, raising=False)
    EngineConfig(model="m", shm_busy_loop_s=0.0).apply_process_env()
    assert os.environ[BUSY_LOOP_ENV] == "0.0"
    EngineConfig(model="m", shm_busy_loop_s=None).apply_process_env()
    assert BUSY_LOOP_ENV not in os.environ
