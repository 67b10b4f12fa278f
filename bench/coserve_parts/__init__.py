"""The parts of the co-serving benchmark; `bench/coserve.py` is the command and documents the figures.

  load      the user load generator (its own process): Poisson open loop, closed-loop calibration
  service   the service in-process over real HTTP (uvicorn on 127.0.0.1)
  jobs      the training jobs through the jobs API
  monitors  what the run watches: event-loop stalls and GC, CPU per process, the co-scheduler, engine deaths
  measure   one run: the engine, the service, the calibrate, users, zo and together phases
  summary   the figures and the JSON result
  plot      user TTFT, ZO step rate and the co-scheduler's budget over the phases
"""
