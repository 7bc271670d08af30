# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch and torchvision must be a matching pair; these two are the ones the test machines carry.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

# --no-cache-dir: torch's wheels are gigabytes; a second copy in pip's cache can fill a small disk
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-cache-dir --upgrade pip
	$(PIP) install -q --no-cache-dir $(TORCH_PINS)
	$(PIP) install -q --no-cache-dir -e ".[test,vision,deepspeed]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/pathmonitor demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(VENV)/.installed
	$(PY) benchmarks/path_norm_speed.py
	$(PY) benchmarks/quantities_speed.py --models resnet18 resnet50
	$(PY) benchmarks/monitor_overhead.py
	$(PY) benchmarks/regularizer_overhead.py
	$(PY) benchmarks/penalty_floor.py
	$(PY) benchmarks/pruning_digits.py
	$(PY) benchmarks/zoo_capture.py

clean:
	rm -rf $(VENV) runs .pytest_cache
