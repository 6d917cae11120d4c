# The pipeline's map. Each stage is one script in stages/ that reads files and
# writes files; each rule below lists exactly what a stage reads, so make reruns a
# stage when its script, its inputs or its parameters change, and nothing else.
#
#   make all      check -> download -> prepare -> tokenizer -> encode -> train -> evaluate
#   make help     every target and variable
#
# Parameters: config/defaults.yaml holds the defaults; Make variables below
# override them (they are passed on as flags). Make only sees files, so every stage
# has a parameter file beside its outputs, $(DATA_DIR)/params/STAGE.json for the data stages
# (download, prepare, encode) and $(ARTIFACTS_DIR)/params/STAGE.json for the others, that the stage itself
# renders (--write-params) on every run and that is replaced only when its content
# changes: a changed parameter rebuilds that stage and what is downstream of it.
#
# Only `make train` and `make all` train (see "which commands train" below): every other
# target uses the trained model as it is, whatever Make variables trained it.

# GNU make 3.81 or newer (the one macOS ships): no grouped targets (`&:`), no function newer than 3.81.
# There .SHELLFLAGS is ignored and recipes run without bash's -e -o pipefail, which none relies on.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
# No .DELETE_ON_ERROR: make must never delete a stage's outputs. The stages write each file atomically
# (temp file + rename), so a failed recipe leaves every file whole, old or new, and what marks a data
# stage done is its record (outputs.json, below), written only after the stage succeeded.
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules --no-print-directory
.DEFAULT_GOAL := help

# ---------------------------------------------------------------- folders and tools
VENV          ?= .venv
DATA_DIR      ?= data
ARTIFACTS_DIR ?= artifacts
CONFIG        ?= config/defaults.yaml
PYTHON_SYSTEM ?= python3
# PYTHON=/path/to/python runs every stage in that existing environment instead of $(VENV), with no
# pip install at all (your own CUDA build of torch; a machine without a package registry).
# `make check PYTHON=...` lists any package it lacks.
PYTHON        ?=
ifeq ($(strip $(PYTHON)),)
PY            := $(VENV)/bin/python
VENV_DONE     := $(VENV)/.installed
else
PY            := $(PYTHON)
VENV_DONE     :=
endif

RAW      := $(DATA_DIR)/raw
PREP     := $(DATA_DIR)/prepared
ENC      := $(DATA_DIR)/encoded
TOK      := $(ARTIFACTS_DIR)/tokenizer
CKPT     := $(ARTIFACTS_DIR)/checkpoints
EVAL     := $(ARTIFACTS_DIR)/eval
EXPORT   := $(ARTIFACTS_DIR)/export
PARAMS   := $(ARTIFACTS_DIR)/params
DATA_PARAMS := $(DATA_DIR)/params

# ---------------------------------------------------------------- paths make can carry
# Make splits file names at spaces and reads : ; # % = | * ? [ ] ( ) $ \ and a leading ~ as its own
# syntax, and the recipes hand folders to bash: a folder holding one of these would silently be other
# files (DATA_DIR="my data" is the folders `my` and `data`). Refused before any rule runs.
UNSAFE_CHARS := : ; \# % = | * ? [ ] ( ) $$ \ ' " ` & < > ! { }
space := $(subst ,, )
define newline


endef
unsafe_chars = $(strip $(if $(filter-out 1,$(words x$(value $(1))x)),a space) $(if $(filter ~%,$(value $(1))),a leading ~) \
                 $(foreach c,$(UNSAFE_CHARS),$(if $(findstring $(c),$(value $(1))),$(c))))
safe_path = $(if $(1),$(call safe_path,$(wordlist 2,99,$(1)),$(subst $(firstword $(1)),_,$(2))),$(patsubst ~%,$(HOME)%,$(subst $(space),_,$(2))))
refuse_unsafe_path = $(if $(call unsafe_chars,$(1)),$(error $(1)='$(value $(1))' holds $(call unsafe_chars,$(1)), \
  which make cannot carry in a file name; nothing was run$(newline)  fix: rerun with \
  $(1)=$(call safe_path,$(UNSAFE_CHARS),$(value $(1))), or any path of letters, digits and / . _ - + @ , \
  (a link to the folder works too)$(newline)  see: docs/troubleshooting.md#make-refuses-a-path-or-a-date$(newline)))
$(foreach variable,VENV DATA_DIR ARTIFACTS_DIR CONFIG PYTHON,$(call refuse_unsafe_path,$(variable)))

# ---------------------------------------------------------------- the code each stage runs
# A stage's outputs depend on its script and on every local module it imports, directly or
# through another module, so editing a module reruns exactly the stages that use it.
# tests/test_layout.py derives these lists from the imports and fails when one drifts.
# (The YAML is not listed: it reaches each stage through its parameter file, so editing
# one section reruns only the stages that read it.)
LIB        := stages/lib
BASE_CODE  := $(LIB)/__init__.py $(addprefix $(LIB)/runtime/,__init__.py config.py errors.py files.py stage.py)
MODEL_CODE := model/__init__.py model/tiny_transformer.py
DATA_CODE  := $(addprefix $(LIB)/data/,__init__.py batches.py language.py)
CODE_download  := stages/download.py $(BASE_CODE) $(addprefix $(LIB)/data/,__init__.py html_text.py http_download.py \
                  http_stream.py local_corpus.py)
CODE_prepare   := stages/prepare.py $(BASE_CODE)
CODE_tokenizer := stages/train_tokenizer.py $(BASE_CODE)
CODE_encode    := stages/encode.py $(BASE_CODE)
CODE_train     := stages/train.py $(BASE_CODE) $(MODEL_CODE) $(DATA_CODE) $(addprefix model/,fast_cpu.py) \
                  $(addprefix $(LIB)/runtime/,code_files.py) $(addprefix $(LIB)/training/,__init__.py checkpoints.py \
                  commands.py distributed.py guards.py hardware.py launch.py optim.py regularisation.py runs.py \
                  samples.py state.py)
# evaluate.py also runs generate.py, to time inference in a fresh process
CODE_evaluate  := stages/evaluate.py stages/generate.py $(BASE_CODE) $(MODEL_CODE) $(DATA_CODE) $(addprefix \
                  $(LIB)/runtime/,processes.py) $(addprefix $(LIB)/training/,__init__.py checkpoints.py \
                  commands.py run_summary.py) $(addprefix $(LIB)/export/,__init__.py onnx_runtime.py)
# export.py also runs generate.py, to time both runtimes in fresh processes
CODE_export    := stages/export.py stages/generate.py $(BASE_CODE) $(MODEL_CODE) $(addprefix \
                  $(LIB)/runtime/,processes.py) $(addprefix $(LIB)/training/,__init__.py checkpoints.py) $(addprefix \
                  $(LIB)/export/,__init__.py hf.py onnx.py onnx_runtime.py proofs.py)

# ---------------------------------------------------------------- variables -> flags
# Empty means "use config/defaults.yaml". `$(call flag,--x,VAR)` adds `--x 'value'` when VAR is set.
flag = $(if $(strip $($(2))),$(1) '$(strip $($(2)))')
BASE_FLAGS = --config '$(CONFIG)' --data-dir '$(DATA_DIR)' --artifacts-dir '$(ARTIFACTS_DIR)'

FLAGS_check     = $(call flag,--min-free-gb,MIN_FREE_GB) $(FLAGS_source)
FLAGS_source    = $(call flag,--corpus-path,CORPUS_PATH) $(call flag,--corpus-url,CORPUS_URL) \
                  $(call flag,--package-index-args,PACKAGE_INDEX_ARGS)
FLAGS_download  = $(FLAGS_source) $(call flag,--corpus-sha256,CORPUS_SHA256) \
                  $(call flag,--target-bytes,CORPUS_BYTES) $(call flag,--english-share,ENGLISH_SHARE) \
                  $(call flag,--max-download-mb,MAX_DOWNLOAD_MB) $(call flag,--stall-timeout-s,STALL_TIMEOUT_S)
FLAGS_prepare   = $(call flag,--val-fraction,VAL_FRACTION) $(call flag,--split-seed,SPLIT_SEED)
FLAGS_tokenizer = $(call flag,--vocab-size,VOCAB_SIZE)
FLAGS_encode    =
FLAGS_train     = $(call flag,--learning-rate,LR) $(call flag,--epochs,EPOCHS) $(call flag,--batch-size,BATCH_SIZE) \
                  $(call flag,--max-seq-length,SEQ_LEN) $(call flag,--warmup-steps,WARMUP) \
                  $(call flag,--min-lr-ratio,MIN_LR_RATIO) $(call flag,--lr-schedule,LR_SCHEDULE) \
                  $(call flag,--optimizer,OPTIMIZER) $(call flag,--muon-lr-scale,MUON_LR_SCALE) \
                  $(call flag,--dropout,DROPOUT) $(call flag,--input-noise,INPUT_NOISE) \
                  $(call flag,--weight-decay,WEIGHT_DECAY) $(call flag,--grad-clip,GRAD_CLIP) \
                  $(call flag,--seed,SEED) $(call flag,--n-layers,N_LAYERS) $(call flag,--d-model,D_MODEL) \
                  $(call flag,--n-heads,N_HEADS) $(call flag,--positions,POSITIONS) $(call flag,--activation,ACTIVATION) \
                  $(call flag,--checkpoint-every,CHECKPOINT_EVERY) \
                  $(call flag,--sample-every,SAMPLE_EVERY) $(call flag,--resume,RESUME) \
                  $(call flag,--device,DEVICE) $(call flag,--dtype,DTYPE) $(call flag,--threads,THREADS) \
                  $(call flag,--max-memory-gb,MAX_MEMORY_GB) \
                  $(if $(filter 1 yes true,$(COMPILE)),--compile,$(if $(filter 0 no false,$(COMPILE)),--no-compile)) \
                  $(call flag,--nproc,NPROC) $(call flag,--nnodes,NNODES) $(call flag,--node-rank,NODE_RANK) \
                  $(call flag,--master-addr,MASTER_ADDR) $(call flag,--master-port,MASTER_PORT)
FLAGS_evaluate  = $(call flag,--checkpoint,CHECKPOINT) $(call flag,--temperature,TEMPERATURE) \
                  $(call flag,--top-k,TOP_K) $(call flag,--top-p,TOP_P)
FLAGS_generate  = $(call flag,--checkpoint,CHECKPOINT) $(call flag,--prompt,PROMPT) \
                  $(call flag,--max-tokens,MAX_TOKENS) $(call flag,--temperature,TEMPERATURE) \
                  $(call flag,--top-k,TOP_K) $(call flag,--top-p,TOP_P) $(call flag,--gen-seed,GEN_SEED) \
                  $(call flag,--runtime,RUNTIME)
FLAGS_export    = $(call flag,--checkpoint,CHECKPOINT)

.PHONY: help all check download prepare tokenizer encode train evaluate export docs generate runs bench sweep test test-fast venv \
        clean-checkpoints clean distclean FORCE

help: ## list targets and variables
	@echo "Pipeline: check -> download -> prepare -> tokenizer -> encode -> train -> evaluate"
	@echo
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-18s %s\n", $$1, $$2 }'
	@echo
	@echo "Variables (empty = the default in $(CONFIG)):"
	@echo "  folders    VENV=$(VENV) DATA_DIR=$(DATA_DIR) ARTIFACTS_DIR=$(ARTIFACTS_DIR) CONFIG=$(CONFIG)"
	@echo "             PYTHON=<an existing python with the packages: no venv, no pip>"
	@echo "  check      MIN_FREE_GB=2"
	@echo "  download   CORPUS_PATH=<file or folder> CORPUS_URL=<url> CORPUS_SHA256=<hex> CORPUS_BYTES=3000000"
	@echo "             ENGLISH_SHARE=0.5 PACKAGE_INDEX_ARGS=<extra pip options> MAX_DOWNLOAD_MB=1024"
	@echo "             STALL_TIMEOUT_S=300 (a download slower than 1 KB/s for this long stops; a rerun resumes)"
	@echo "  prepare    VAL_FRACTION=0.1 SPLIT_SEED=1234"
	@echo "  tokenizer  VOCAB_SIZE=8000"
	@echo "  train      LR=0.002 EPOCHS=20 BATCH_SIZE=32 SEQ_LEN=256 WARMUP=100 MIN_LR_RATIO=0.1 DROPOUT=auto INPUT_NOISE=0.2"
	@echo "             WEIGHT_DECAY=0.6 GRAD_CLIP=1.0 SEED=1337 N_LAYERS=2 D_MODEL=128 N_HEADS=4"
	@echo "             OPTIMIZER=muon|adamw MUON_LR_SCALE=2.25 LR_SCHEDULE=cosine|wsd"
	@echo "             POSITIONS=rotary|learned ACTIVATION=relu2|gelu|relu"
	@echo "             CHECKPOINT_EVERY=5 SAMPLE_EVERY=5 RESUME=auto|yes|no DEVICE=cpu DTYPE=auto|float32|bfloat16"
	@echo "             COMPILE=yes|no THREADS=0 (per process; 0 = cores / NPROC) MAX_MEMORY_GB=0 (0 = available RAM)"
	@echo "             NPROC=1 (torchrun processes) NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500"
	@echo "  evaluate   CHECKPOINT=best_model.pt TEMPERATURE=0.8 TOP_K=50 TOP_P=1.0"
	@echo "  export     CHECKPOINT=best_model.pt"
	@echo "  generate   PROMPT='In the beginning' MAX_TOKENS=100 TEMPERATURE=0.8 TOP_K=50 GEN_SEED=1 RUNTIME=torch|onnx"
	@echo "  sweep      SWEEP='$(SWEEP)' SWEEP_EPOCHS=$(SWEEP_EPOCHS)"
	@echo "  test       TEST_WORKERS=2 (pytest processes; 0 = one)"

# ---------------------------------------------------------------- environment
venv: $(VENV_DONE) ## create .venv from requirements.txt

ifneq ($(VENV_DONE),)
$(VENV_DONE): requirements.txt
	@$(PYTHON_SYSTEM) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed to create $(VENV); install it or run make PYTHON_SYSTEM=python3.11")'
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@
endif

check: $(VENV_DONE) ## prerequisites: Python, packages, disk space, corpus source
	$(PY) stages/check.py $(BASE_FLAGS) $(FLAGS_check)

# ---------------------------------------------------------------- parameter files
# Always rendered, replaced only when different (the stage then prints what changed,
# old -> new, before it reruns): Make then compares real mtimes.
# Folder locations are not parameters: they never appear in these files, so a second
# ARTIFACTS_DIR sharing one DATA_DIR reruns no data stage.
$(PARAMS)/%.json: FORCE | $(VENV_DONE)
	@$(PY) stages/$(script_$*).py $(BASE_FLAGS) $(FLAGS_$*) --write-params $@
$(DATA_PARAMS)/%.json: FORCE | $(VENV_DONE)
	@$(PY) stages/$(script_$*).py $(BASE_FLAGS) $(FLAGS_$*) --write-params $@
script_download  = download
script_prepare   = prepare
script_tokenizer = train_tokenizer
script_encode    = encode
script_train     = train
script_evaluate  = evaluate
script_export    = export

# ---------------------------------------------------------------- what times cannot tell
# Make compares file times, and a time can lie. One check runs before make decides anything:
# - an input no stage writes (code, config, a corpus file) dated in the future is refused with the fix:
#   make would rebuild from it on every run until the clock caught up;
# - the corpus files of CORPUS_PATH are never make's own prerequisites (a name with a space, a broken
#   link or A.TXT would break or escape them): INPUTS lists them as download.py chooses them, with their
#   sizes and times, and is rewritten when that list changes, which reruns download;
# - each data stage's outputs are compared with its record (below): when one is missing or damaged, the
#   stage's FOLDER/outputs-checked.txt is rewritten, so make reruns that stage.
INPUTS  := $(DATA_PARAMS)/inputs.txt
SOURCES  = $(sort $(CODE_download) $(CODE_prepare) $(CODE_tokenizer) $(CODE_encode) $(CODE_train) $(CODE_evaluate) \
             $(CODE_export) requirements.txt $(CONFIG))
$(INPUTS): FORCE | $(VENV_DONE)
	@$(PY) stages/check.py $(BASE_FLAGS) $(FLAGS_source) --inputs $@ $(SOURCES)
# Its recipe is empty, yet it runs every time: make then reads the stamp's time again, after the check.
%/outputs-checked.txt: $(INPUTS) FORCE ;
# evaluate and export outside `make train`/`make all` rebuild no data (see "which commands train"), so
# they only refuse future-dated code: rewriting INPUTS there for another CORPUS_PATH (or none) would make
# the next `make train CORPUS_PATH=...` rebuild the data it already has.
DATES_CHECKED = $(if $(TRAINS),$(INPUTS),dates-checked)
.PHONY: dates-checked  # a step of the rules above, not a target to type: no help row
dates-checked: FORCE | $(VENV_DONE)
	@$(PY) stages/check.py $(BASE_FLAGS) --future-dates $(SOURCES)

# ---------------------------------------------------------------- stages
# A data stage writes several files. Each is a target of its own (`make data/encoded/train.npy` works, and
# a rule downstream names exactly the files it reads), made by one rule: the stage's record,
# FOLDER/outputs.json (each output's size, time and sha256), written only after the stage succeeded.
record_outputs = @$(PY) stages/check.py $(BASE_FLAGS) --record $(1) $(OUT_$(1))

OUT_download  := $(RAW)/corpus.txt $(RAW)/corpus.json
OUT_prepare   := $(PREP)/train.txt $(PREP)/val.txt $(PREP)/stats.json
OUT_tokenizer := $(TOK)/spm.model $(TOK)/spm.vocab $(TOK)/tokenizer.json
OUT_encode    := $(ENC)/train.npy $(ENC)/train.json $(ENC)/val.npy $(ENC)/val.json

all: check evaluate ## run the whole pipeline (each stage only if out of date)
	@$(PY) -c 'import json; r = json.load(open("$(EVAL)/report.json")); print("report: $(EVAL)/report.md"); print("  " + r["headline"])'

download: $(OUT_download) ## 1. corpus -> data/raw/corpus.txt
$(OUT_download): $(RAW)/outputs.json ;
$(RAW)/outputs.json: $(CODE_download) $(DATA_PARAMS)/download.json $(INPUTS) $(RAW)/outputs-checked.txt | $(VENV_DONE)
	$(PY) stages/download.py $(BASE_FLAGS) $(FLAGS_download)
	$(call record_outputs,download)

prepare: $(OUT_prepare) ## 2. clean + split 90/10 -> data/prepared/{train,val}.txt
$(OUT_prepare): $(PREP)/outputs.json ;
$(PREP)/outputs.json: $(CODE_prepare) $(DATA_PARAMS)/prepare.json $(RAW)/corpus.txt $(PREP)/outputs-checked.txt
	$(PY) stages/prepare.py $(BASE_FLAGS) $(FLAGS_prepare)
	$(call record_outputs,prepare)

tokenizer: $(OUT_tokenizer) ## 3. SentencePiece unigram -> artifacts/tokenizer/spm.model
$(OUT_tokenizer): $(TOK)/outputs.json ;
$(TOK)/outputs.json: $(CODE_tokenizer) $(PARAMS)/tokenizer.json $(PREP)/train.txt $(TOK)/outputs-checked.txt
	$(PY) stages/train_tokenizer.py $(BASE_FLAGS) $(FLAGS_tokenizer)
	$(call record_outputs,tokenizer)

encode: $(OUT_encode) ## 4. token ids -> data/encoded/{train,val}.npy
$(OUT_encode): $(ENC)/outputs.json ;
$(ENC)/outputs.json: $(CODE_encode) $(DATA_PARAMS)/encode.json $(TOK)/spm.model $(TOK)/tokenizer.json $(PREP)/train.txt \
                     $(PREP)/val.txt $(ENC)/tokenizer-checked.txt $(ENC)/outputs-checked.txt
	$(PY) stages/encode.py $(BASE_FLAGS) $(FLAGS_encode)
	$(call record_outputs,encode)
# Make compares times, which cannot tell two tokenizers apart (a copied or restored spm.model is older
# than the token files). Rewritten only when a token file's sidecar names another tokenizer or text than
# the current ones: then it is newer than the token files, which are rebuilt, and training after them.
$(ENC)/tokenizer-checked.txt: FORCE | $(VENV_DONE)
	@$(PY) stages/encode.py $(BASE_FLAGS) --check-tokenizer $@

# Which commands train, the one rule: `make train` and `make all` bring the model up to
# date with the settings they are given (a finished run with the same settings, data and
# code is restored from the archive instead of trained again). Every other target
# (evaluate, export, generate, runs) uses the model in $(CKPT) as it is: a `make evaluate` after
# `make train LR=0.001` evaluates that model and never retrains because LR is not repeated.
TRAINS := $(filter train all,$(MAKECMDGOALS))

train: $(CKPT)/train_done.json ## 5. train the model -> artifacts/checkpoints/
ifneq ($(TRAINS),)
$(CKPT)/train_done.json: $(CODE_train) $(PARAMS)/train.json $(OUT_encode) $(OUT_tokenizer) $(RAW)/corpus.json $(PREP)/val.txt
	TRAIN_STARTED_BY_MAKE=1 $(PY) stages/train.py $(BASE_FLAGS) $(FLAGS_train)
else
$(CKPT)/train_done.json:
	@echo "error: no trained model in $(CKPT) (no finished training run)" >&2
	@echo "  fix: train one with \`make train\` (or \`make all\`); an interrupted run resumes where it stopped" >&2
	@exit 1
endif

evaluate: $(EVAL)/report.json ## 6. report, plots, samples, latency -> artifacts/eval/
$(EVAL)/report.json: $(CODE_evaluate) $(PARAMS)/evaluate.json $(CKPT)/train_done.json $(if $(TRAINS),$(ENC)/val.npy) | $(DATES_CHECKED)
	$(PY) stages/evaluate.py $(BASE_FLAGS) $(FLAGS_evaluate)

export: $(EXPORT)/export.json ## 7. Hugging Face + ONNX copies of the model, proven equal -> artifacts/export/
$(EXPORT)/export.json: $(CODE_export) $(PARAMS)/export.json $(EXPORT)/files-checked.txt $(CKPT)/train_done.json \
                       $(if $(TRAINS),$(TOK)/spm.model) | $(DATES_CHECKED)
	$(PY) stages/export.py $(BASE_FLAGS) $(FLAGS_export)
# Rewritten only when an exported file is missing or differs from export.json's records (size, sha256):
# then it is newer than export.json, and the export is rebuilt.
$(EXPORT)/files-checked.txt: FORCE | $(VENV_DONE)
	@$(PY) stages/export.py $(BASE_FLAGS) --check-files $@

# Every measured figure in docs/*.md and README.md is written by a cog block from docs/data/, the snapshot
# of the default run; tests/test_docs.py runs `cog --check` and compares the snapshot's fingerprint with
# the defaults, so a change of defaults needs `make all && make export && make docs`.
COG = $(PY) -m cogapp -P -I docs -p "from cog_figures import *" --verbosity=1
docs: $(EVAL)/report.json $(EXPORT)/export.json runs | $(VENV_DONE) ## snapshot of the default run -> docs/data/, docs/images/, every figure in docs/ and README.md rewritten (cog)
	$(PY) stages/docs_snapshot.py $(BASE_FLAGS)
	$(PY) stages/figures.py $(BASE_FLAGS)
	$(COG) -r docs/*.md README.md

generate: $(VENV_DONE) ## print a continuation of PROMPT from the trained model (RUNTIME=onnx: the export, no torch)
	$(PY) stages/generate.py $(BASE_FLAGS) $(FLAGS_generate)

runs: $(VENV_DONE) ## table of every kept run (current + archived) -> artifacts/runs/runs.md, val_curves.png
	$(PY) stages/list_runs.py $(BASE_FLAGS)

BENCH_FLAGS = --config '$(CONFIG)' --data-dir '$(DATA_DIR)' --artifacts-dir '$(ARTIFACTS_DIR)'
bench: $(OUT_encode) $(OUT_tokenizer) ## speed figures: eager fp32 vs the fast path, MFU, stage times, the step's profile, vs nanoGPT
	$(PY) stages/bench.py $(BENCH_FLAGS)
	$(PY) stages/bench.py --profile $(BENCH_FLAGS)
	$(PY) stages/bench.py --nanogpt $(BENCH_FLAGS)

SWEEP        ?= weight_decay=0.3,1.0 dropout=0.1,0.3
SWEEP_EPOCHS ?= 20
sweep: $(OUT_encode) $(OUT_tokenizer) ## train one run per SWEEP setting, table in artifacts/sweep/results.md
	$(PY) stages/sweep.py --grid '$(SWEEP)' --epochs $(SWEEP_EPOCHS) --data-dir '$(DATA_DIR)' --artifacts-dir '$(ARTIFACTS_DIR)'

# Two processes by default: most tests wait on one-thread stage scripts, so two overlap well on two
# cores. A file's tests stay in one process (they share its fixtures). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(VENV_DONE) ## the whole test suite (TEST_WORKERS=2 processes)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
test-fast: $(VENV_DONE) ## the unit tier: in-process tests, seconds; run it on every edit
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

# ---------------------------------------------------------------- cleaning
# Nothing is removed under a training run or an export that is still going: each holds an flock on
# its lock file while it runs (lib/runtime/files.py), and flock(1) cannot take it then. (Without flock(1),
# nothing is checked.)
RUN_LOCKS = $(ARTIFACTS_DIR)/.train.lock $(ARTIFACTS_DIR)/export/.export.lock
define refuse_while_running
	@for lock in $(RUN_LOCKS); do \
	  if [ -e "$$lock" ] && command -v flock >/dev/null && ! flock -n "$$lock" true; then \
	    echo "error: $$lock is held by a running process (pid $$(cat "$$lock")): nothing was removed" >&2; \
	    echo "  fix: let it finish, or stop it (Ctrl+C: training saves last.pt and resumes later), then rerun make $@" >&2; \
	    exit 1; \
	  fi; \
	done
endef

clean-checkpoints: ## remove checkpoints and trained models only (incl. runs moved aside)
	$(refuse_while_running)
	rm -rf $(CKPT) $(ARTIFACTS_DIR)/checkpoints-archive

# Sweep tables and benchmark figures take hours to remake: only distclean removes them.
KEPT_BY_CLEAN = $(ARTIFACTS_DIR)/sweep $(ARTIFACTS_DIR)/bench

clean: ## remove generated data and artifacts; keep the corpus, the venv, sweep and bench results
	$(refuse_while_running)
	rm -rf $(PREP) $(ENC) $(ARTIFACTS_DIR)/.train.lock \
	  $(filter-out $(KEPT_BY_CLEAN),$(wildcard $(ARTIFACTS_DIR)/*))

distclean: clean ## remove everything generated, the corpus and the venv too
	rm -rf $(RAW) $(DATA_PARAMS) $(VENV) $(ARTIFACTS_DIR)

FORCE:
