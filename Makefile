# Two commands: `make demo` (the main job) and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch ships on the project machines' disk; elsewhere pip fetches it.
TORCH ?= torch==2.13.0

.PHONY: venv test docs demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q --index-url https://download.pytorch.org/whl/cpu "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,docs,eval]"
	touch $@

venv: $(VENV)/.installed

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
