# vlablocks: `make demo` (the main job) and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow mutation install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,sim]"
	# openpi's websocket client, for tests/test_serve.py (a real client against `vlablocks serve`): --no-deps because
	# it pins numpy<2; the modules used (websocket_client_policy, msgpack_numpy, base_policy) run on numpy 2, and its
	# other dependency, dm-tree, is only for modules not used here.
	$(PY) -m pip install -q --no-deps openpi-client==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(PY) -m vlablocks.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=10

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# mutation testing (slow: ~1 h for every area on 2 cores; not part of `make test` or CI): docs/mutation.md
mutation: $(STAMP)
	$(PY) -m pip install -q -e ".[mutation]"
	$(PY) dev/mutation.py $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
