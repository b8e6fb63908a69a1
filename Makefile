# Two commands a newcomer needs: `make demo` and `make test` (see README "Quick start").
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test bench gpu-check clean chromium

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	$(BIN)/python cli.py search --category screw --budget 10m

# The report test renders the HTML page in Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium package (sudo apt-get install chromium) for the report test" >&2; exit 1; fi; }

# lint-imports: the layer contracts in pyproject.toml ([tool.importlinter]).
test: venv chromium
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

# gpu_check.py is the GPU check's driver: `make gpu-check` runs it (on a CPU: --smoke).
bench: venv
	for script in benchmarks/*.py; do [ "$$script" = benchmarks/gpu_check.py ] && continue; \
	  echo "== $$script"; $(BIN)/python $$script || exit 1; done

gpu-check: venv
	bash benchmarks/gpu_check.sh $$($(BIN)/python -c "import torch; print('' if torch.cuda.is_available() else '--smoke')")

clean:
	rm -rf $(VENV) runs results models .pytest_cache
