# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET := { grep -v "^WARNING: Location" || true; }
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test install clean stock benchmarks

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | $(QUIET)
	$(PIP) install torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET)
	$(PIP) install -c constraints.txt -e '.[test]' 2>&1 | $(QUIET)
	$(BIN)/python -c "import adaptsoup, adaptsoup_cli, adaptsoup_bench, torch, timm, onnxruntime"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m adaptsoup_bench.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

stock: $(STAMP)
	$(BIN)/python benchmarks/train_stock.py --bf16

# Every CPU benchmark in turn (hours on 2 cores; each writes its measured wall time); each step resumes where it stopped.
benchmarks: stock
	$(BIN)/adaptsoup bench c10c --mode quick --no-progress
	$(BIN)/adaptsoup bench c10c --mode full --no-progress
	$(BIN)/adaptsoup bench c10c --mode quick --severity 3 --no-progress
	$(BIN)/adaptsoup bench families --mode quick --no-progress
	$(BIN)/adaptsoup bench label-free --preset cifar --mode quick --no-progress
	$(BIN)/python -m adaptsoup_bench.precision_speed
	$(BIN)/python benchmarks/deploy_speed.py
	$(BIN)/python -m adaptsoup_bench.predict_speed
	$(BIN)/python -m adaptsoup_bench.static_calibration
	$(BIN)/python -m adaptsoup_bench.soup_memory --self-season

clean:
	rm -rf $(VENV) build *.egg-info
