# Two commands do all the set-up on a fresh clone: `make run` and `make test`.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.zoserve-installed
WHEELS    := $(wildcard /opt/wheels)
UV        := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
EXTRAS    ?= cpu,dev

.PHONY: run test env bench clean-env

$(STAMP): pyproject.toml uv-excludes.txt
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
	@test -x $(PY) || $(UV) venv -q -p python3.11 $(VENV)
	$(UV) pip install -q --python $(PY) $(if $(WHEELS),--find-links $(WHEELS)) \
		--excludes uv-excludes.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

env: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/zoserve serve

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/step_throughput.py --json

clean-env:
	rm -rf $(VENV)
