# dglstm-lm — every target uses .venv; nothing needs activating.
#
# Hydra overrides pass straight through:  make train model=dglstm trainer.max_epochs=3 seed=7
# Sweeps take Hydra's multirun syntax:     make sweep model=lstm,stacked_lstm,dglstm seed=1,2,3

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install: by default torch 2.13.0 from pip's own index (on Linux, PyPI's wheel brings
# CUDA libraries). CPU only:  make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# A CUDA build:              make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

# Variables of this Makefile itself, never forwarded to Hydra. (ckpt=, dir=, seed= ... of eval, generate and
# report are read by those targets only; train and sweep forward everything else.)
MAKE_VARS := PYTHON VENV TORCH_SPEC TORCH_INDEX ARGS
# Command-line assignments arrive in $(MAKEOVERRIDES) in reverse order, spaces escaped as '\ ': keep an
# escaped space inside its override (as _SP_) while splitting, and give it back inside the shell quotes.
_empty :=
_space := $(_empty) $(_empty)
_reverse = $(if $(1),$(call _reverse,$(wordlist 2,$(words $(1)),$(1))) $(firstword $(1)))
_is_make_var = $(filter $(MAKE_VARS),$(firstword $(subst =, ,$(1))))
_ASSIGNMENTS := $(call _reverse,$(subst \$(_space),_SP_,$(MAKEOVERRIDES)))
OVERRIDES := $(strip $(foreach o,$(_ASSIGNMENTS),$(if $(call _is_make_var,$(o)),,$(o))))
# Each override single-quoted for the shell, so that Hydra sees quotes, braces and brackets as typed.
QUOTED := $(foreach o,$(OVERRIDES),'$(subst _SP_,$(_space),$(subst ','\'',$(o)))')
# Hydra reads these as overrides; `make` must not also export them into the environment.
unexport $(foreach o,$(_ASSIGNMENTS),$(firstword $(subst =, ,$(o))))
# `make compare`'s own variables; its other assignments are Hydra overrides for all its stages.
COMPARE_VARS := models trials seeds proxy experiment space dir jobs final_jobs complete_pruned archive status
_is_compare_var = $(filter $(COMPARE_VARS),$(firstword $(subst =, ,$(1))))
COMPARE_QUOTED := $(foreach o,$(OVERRIDES),$(if $(call _is_compare_var,$(o)),,'$(subst _SP_,$(_space),$(subst ','\'',$(o)))'))

.DEFAULT_GOAL := help
.PHONY: help setup data train sweep search compare eval generate bench bench-gpu runs report test test-fast lint format slurm-up slurm-down clean

help:  ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# pip prints what it downloads and installs; each step says what it is and how long it took.
_step = @echo "[setup $(1)/5] $(2)" && t0=$$(date +%s) && $(3) && echo "[setup $(1)/5] done in $$(( $$(date +%s) - t0 )) s"
PIP := $(VENV)/bin/pip install --progress-bar on --no-input --disable-pip-version-check

setup:  ## create .venv: torch (TORCH_SPEC) first, then the project with dev extras, then the fused CPU kernel (2-3 min with torch's wheel at hand; longer where it downloads)
	$(call _step,1,virtual environment $(VENV),$(PYTHON) -m venv $(VENV))
	$(call _step,2,pip,$(PIP) --quiet --upgrade pip)
	$(call _step,3,$(TORCH_SPEC) (the largest download),$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH_SPEC)')
	$(call _step,4,the project and its dependencies (Hydra, W&B, datasets, Triton ...),$(PIP) -e '.[dev]')
	$(call _step,5,the fused CPU kernel (a C++ build: about a minute),$(PY) -m dglstm_lm.build_kernels)

data:  ## prepare PTB (verify, tokenise, cache) and print the split statistics
	$(PY) -m dglstm_lm.data $(QUOTED)

train:  ## train one model; any Hydra override, e.g. model=dglstm experiment=zaremba_small seed=7
	$(PY) -m dglstm_lm.train $(QUOTED)

sweep:  ## Hydra multirun over any grid, e.g. model=lstm,stacked_lstm,dglstm seed=1,2,3
	$(PY) -m dglstm_lm.train --multirun $(QUOTED)

search:  ## one model's Optuna search (make compare's search stage): model=dglstm trials=24 [proxy= space= dir= jobs=]
	$(PY) -m dglstm_lm.compare --stages search --models '$(or $(model),dglstm)' $(foreach v,$(filter-out models,$(COMPARE_VARS)),$(if $($(v)),--$(v) '$($(v))')) $(ARGS) $(filter-out 'model=%,$(COMPARE_QUOTED))

compare:  ## equal-budget tuned comparison: models=a,b trials=24 seeds=2,3,4 [proxy= experiment= space= dir= jobs= final_jobs= complete_pruned=1 archive= status=1]
	$(PY) -m dglstm_lm.compare $(foreach v,$(COMPARE_VARS),$(if $($(v)),--$(v) '$($(v))')) $(ARGS) $(COMPARE_QUOTED)

eval:  ## evaluate a checkpoint on valid and test: make eval ckpt=outputs/runs/.../checkpoints/best.pt [split=train,valid,test full=1]
	$(PY) -m dglstm_lm.evaluate --ckpt '$(ckpt)' $(if $(split),--split '$(split)') $(if $(filter-out 0 false no,$(full)),--full) $(ARGS)

GENERATE_ARGS = $(strip $(if $(temperature),--temperature $(temperature)) $(if $(length),--length $(length)) \
  $(if $(seed),--seed $(seed)) $(if $(prompt),--prompt '$(prompt)'))
generate:  ## sample text: make generate ckpt=... [temperature=1.0 length=50 seed=1 prompt='the market']
	$(PY) -m dglstm_lm.generate --ckpt '$(ckpt)' $(GENERATE_ARGS) $(ARGS)

# make bench isa=avx2: torch's kernels, oneDNN and MKL limited to AVX2 (an AVX2 machine measured on an AVX-512 one)
ISA_ENV = $(if $(filter avx2 AVX2,$(isa)),ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2)
bench:  ## throughput and memory of every core against nn.LSTM; data preparation speed -> outputs/bench/ [isa=avx2]
	@case "$(isa)" in ""|avx2|AVX2) ;; *) echo "error: isa=$(isa): expected avx2 (or nothing: the CPU's own)" >&2; exit 2;; esac
	$(ISA_ENV) $(PY) -m dglstm_lm.bench $(ARGS)

bench-gpu:  ## on CUDA (~8 min): cuDNN LSTM, stacked, DGLSTM (triton, graphs, python), fp32/bf16, e2e smoke + resume
	$(PY) -m dglstm_lm.bench_gpu $(ARGS)

runs:  ## list the runs under outputs/ (or dir=): status, overrides, epochs, best valid ppl, data
	$(PY) -m dglstm_lm.runs $(if $(dir),--dir '$(dir)') $(ARGS)

report:  ## perplexity tables and figures from outputs/ (or dir=<run or sweep dir>, baseline=<row>) -> outputs/report/
	$(PY) -m dglstm_lm.report $(if $(dir),--dir '$(dir)') $(if $(baseline),--baseline '$(baseline)') $(ARGS)

test:  ## the whole test suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest -m 'slow or not slow' --durations=25 $(ARGS)

test-fast:  ## the fast tests only
	$(PY) -m pytest $(ARGS)

lint:  ## ruff
	$(VENV)/bin/ruff check dglstm_lm tests
	$(VENV)/bin/ruff format --check dglstm_lm tests

format:  ## ruff format + autofix
	$(VENV)/bin/ruff check --fix dglstm_lm tests
	$(VENV)/bin/ruff format dglstm_lm tests

slurm-up:  ## start a one-node SLURM cluster on this machine (Debian slurm-wlm + munge)
	scripts/slurm_local.sh start

slurm-down:  ## stop the daemons that slurm-up started
	scripts/slurm_local.sh stop

clean:  ## remove caches and build files (keeps .venv, data/ptb and outputs/)
	rm -rf build .pytest_cache .ruff_cache data/cache
	find . -name __pycache__ -prune -exec rm -rf {} +
