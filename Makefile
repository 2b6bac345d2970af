# The two commands: `make speedrun` (the main job) and `make test` (the suite). Both set up .venv themselves.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: speedrun test test-slow bench install install-sandbox install-llama clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# The code sandbox's filesystem boundary: Debian's bubblewrap (nanoseek/tasks/sandbox.py). Installed
# when missing and this is root with apt-get; otherwise the sandbox warns and runs without it.
install-sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
	      || echo "install-sandbox: apt-get could not install bubblewrap; the sandbox runs without its filesystem boundary"; \
	  else echo "install-sandbox: bubblewrap (bwrap) is missing and cannot be installed here (needs root and apt-get); the sandbox runs without its filesystem boundary"; fi; }

# llama.cpp (llama-cpp-python) for the GGUF export's slow tests and the inference benchmark: compiled for any x86-64 CPU
# (no -march=native), without its examples, tests or server; pip caches the built wheel.
install-llama: $(STAMP)
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
	  $(BIN)/pip install -q --disable-pip-version-check -e '.[llama]'

speedrun: $(STAMP)
	$(BIN)/nanoseek speedrun $(ARGS)

test: $(STAMP) install-sandbox
	$(BIN)/python -m pytest $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(ARGS)

# each with the sides its targets name: the compiled engine (decode) and the compiled GRPO stage
bench: $(STAMP) install-llama
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_train_small.py
	$(BIN)/python benchmarks/bench_infer.py --compile
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/bench_grpo.py --compile --warmup 3

clean:
	rm -rf $(VENV) .pytest_cache
