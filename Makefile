# Two entry points a newcomer needs: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install what they need; nothing depends on what was installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo demo-full test bench install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "torch>=2.11" numpy
	# no build isolation: the C++/CUDA extensions (csrc/) build against the torch just installed
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m zreward demo --preset quick --out demo_out

demo-full: $(STAMP)
	$(BIN)/python -m zreward demo --preset full --out demo_full

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks demo_out demo_full
