# Two commands: `make demo` (the main job) and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Without an NVIDIA GPU (no nvidia-smi) torch comes from PyTorch's CPU-only index, a
# fraction of the size of the CUDA build the default index serves on Linux; the default
# index is added so that torch's dependencies resolve. A short timeout and no retries make
# an unreachable CPU index cost seconds, and if that install fails the default index alone
# is used. With an NVIDIA GPU, the default index (the CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEFAULT_INDEX ?= $(or $(PIP_INDEX_URL),https://pypi.org/simple)

.PHONY: venv torch test docs demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(MAKE) --no-print-directory torch
	$(PY) -m pip install -q -e ".[test,docs,eval]"
	touch $@

venv: $(VENV)/.installed

# torch into the existing .venv, chosen for this machine (see the top of this file).
torch:
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: $(TORCH) from the default index"; \
		$(PY) -m pip install -q "$(TORCH)"; \
	else \
		echo "no NVIDIA GPU: $(TORCH) from PyTorch's CPU index $(TORCH_CPU_INDEX) first"; \
		$(PY) -m pip install -q --timeout 10 --retries 0 --index-url "$(TORCH_CPU_INDEX)" \
			--extra-index-url "$(DEFAULT_INDEX)" "$(TORCH)" \
		|| { echo "the CPU index install failed: $(TORCH) from the default index"; \
			$(PY) -m pip install -q "$(TORCH)"; }; \
	fi

# Two pytest workers, one torch thread each (tests/conftest.py): tiny models run fastest so.
test: venv
	$(PY) -m pytest -q -n 2
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

docs: venv
	$(PY) -m mkdocs serve

demo: venv
	$(PY) recipes/demo.py

bench: venv
	$(PY) benchmarks/dense_forward.py

clean:
	rm -rf $(VENV) site runs .pytest_cache .hypothesis
