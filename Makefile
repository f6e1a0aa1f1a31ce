# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
DEEPSPEED_SPEC := deepspeed>=0.18,<0.20
# The [lmms] extra (dpn_lmms/, `lmms-eval eval --model dpn`). lmms-eval lists torchvision, whose PyPI wheel
# is a CUDA build that fails to import beside the CPU torch ("operator torchvision::nms does not exist"),
# and once it is installed transformers picks torchvision image processors and every import breaks. So
# lmms-eval goes in without its dependency list, then those of its dependencies that its evaluator imports
# on our path (with them, and what .[dev] brings, the lmms-eval CLI and tests/test_lmms.py run; torch stays
# 2.13.0+cpu; filelock<4 as the extra says). Elsewhere, with a torch whose torchvision is on PyPI (CUDA
# builds), `pip install -e '.[lmms]'` is the one command.
LMMS_SPEC := $(shell sed -n 's/^lmms = \["\([^"]*\)".*/\1/p' pyproject.toml)
LMMS_RUNTIME := "filelock<4" "datasets>=2.19" "evaluate>=0.4" pytablewriter "sacrebleu>=1.5" "scikit-learn>=0.24" einops \
	sympy loguru "tenacity>=8.3" pydantic python-dotenv jinja2 aiohttp
# The stamp changes whenever the dependency list does, so `make` re-installs exactly then.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install demo test test-fast bench lint clean
install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, pinned: the CPU wheel lies on local disk.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	# DeepSpeed's sdist must build against the torch above, never in an isolated env with a CUDA torch.
	$(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	# The torch installed above stays: every later call is constrained to it (pyproject only says torch>=2.4).
	$(PIP) install -q -e ".[dev]" --constraint <(echo "torch==$(TORCH_VERSION)")
	$(PIP) install -q --no-deps "$(LMMS_SPEC)"
	$(PIP) install -q $(LMMS_RUNTIME) --constraint <(echo "torch==$(TORCH_VERSION)")
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(VENV)/bin/dpn demo

test: install
	$(VENV)/bin/python -m pytest -q -ra --durations=20

test-fast: install
	$(VENV)/bin/python -m pytest -q -ra -m "not slow"

bench: install
	$(VENV)/bin/python bench/efficiency.py --markdown bench/RESULTS_efficiency.md
	$(VENV)/bin/python bench/train_step.py
	$(VENV)/bin/python bench/preprocess_throughput.py
	$(VENV)/bin/python bench/learnability.py probe --skills both --steps 400 --eval-every 100

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf .dpn_work
