# diffae-ray: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint bench clean

install: $(STAMP)

# Reinstall only when the dependency list changes; pip output goes to a log (it is long).
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/install.log) ..."
	@$(VPY) -m pip install --upgrade pip >$(VENV)/install.log 2>&1
	@$(VPY) -m pip install torch==2.14.1 torchvision==0.29.1 >>$(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@$(VPY) -m pip install -e '.[dev]' >>$(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@touch $(STAMP)
	@echo "installed."

test: install
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check diffae_core pipelines serving tests benchmarks

bench: install
	$(VPY) benchmarks/train_step.py
	$(VPY) benchmarks/sampling.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
