# diffae-ray: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-model test lint bench clean

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

# The whole product on this machine: data -> Ray Train (2 workers) -> latents -> latent DPM -> classifier ->
# oracle evaluation -> report -> Serve over HTTP. Reuses finished steps; DEMO_ARGS="--fresh" starts over.
demo: install
	$(VPY) -m pipelines.demo $(DEMO_ARGS)

# The longer-trained demo model (same pipeline, bigger budget), written to outputs/demo-model.
demo-model: install
	$(VPY) -m pipelines.demo --out outputs/demo-model --images 20000 --budget-images 192000 --latent-budget 400000 --demo-model "" --ship assets/demo-model $(DEMO_ARGS)

# Installs the Debian packages some tests use when missing (as root with apt-get); without them those tests skip.
test: install
	@bash tests/system-packages.sh
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check diffae_core pipelines serving tests benchmarks

# Every benchmark in its own process; writes benchmarks/RESULTS.md (machine, commands, date, numbers).
bench: install
	$(VPY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
