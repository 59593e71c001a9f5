# minemap — two commands for a newcomer: `make demo` and `make test`.
# A GPU user picks the torch build, e.g.:
#   make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
# the suite's worker processes (pytest-xdist; the cores shared between them, one file per worker at a time)
TEST_WORKERS ?= auto

.PHONY: venv demo test bench clean lock

$(BIN)/minemap: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	@touch $@

venv: $(BIN)/minemap

demo: venv
	$(BIN)/minemap demo --out demo-out

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=8

bench: venv
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# after upgrading the environment and passing the tests: record its versions as the constraints of every install
lock: venv
	@{ sed -n '/^#/p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^torch==' -e '^minemap'; } > requirements.lock.tmp
	@mv requirements.lock.tmp requirements.lock

clean:
	rm -rf $(VENV) demo-out
