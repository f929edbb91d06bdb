# Two commands do all set-up on a fresh machine:
#   make demo   -- build a tiny chat corpus + tokenizer, fine-tune with 2 Ray workers under ZeRO-3, reload, generate
#   make test   -- the test suite (unit + distributed CPU tiers; GPU tests skip without CUDA)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The default path compiles nothing; the offload templates JIT-build DeepSpeed's CPU Adam (and
# async I/O for NVMe) on first use: keep those builds between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
# The environment's tools first: its ninja is the one the JIT ops were built with (another
# ninja version hashes build commands differently and would rebuild every op).
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	# torch first and pinned: anything unpinned would pull a multi-GB CUDA build here.
	$(BIN)/pip install torch==2.13.0
	# deepspeed after torch: its setup inspects the installed torch.
	$(BIN)/pip install -e ".[test]"
	# NVMe offload (ds_configs/zero3_nvme*) swaps through DeepSpeed's async I/O op, which links
	# libaio: installed here where this machine lets us (root with apt-get); elsewhere a run
	# with an nvme template says what to install before it starts.
	@test -e /usr/include/libaio.h || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q libaio-dev >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libaio-dev >/dev/null 2>&1; }; } ; } || \
	  echo "libaio-dev not installed: NVMe offload templates will not run here"
	# What the test suite runs against beside the package: a real SLURM (slurm-wlm, munge) for
	# the SLURM launcher's test, installed here (root with apt-get, ~10 s), never by a test;
	# the test skips, saying why, where they are missing.
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  slurm-wlm munge >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; }; }; } || \
	  echo "slurm-wlm/munge not installed: the SLURM launcher's test will skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sftscale.demo --workdir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs .cache
