# Every target installs first if needed. `make install` is idempotent (stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= data/digits
PRETRAIN_CONFIG ?= configs/run/digits_sepvit_lite.yaml
ARGS    ?=

.PHONY: install bytecode test test-fast lint format pretrain clean slurm-up slurm-start slurm-down bench

# the requirements of this project (installed without them) with its dev extra, one per line for pip -r; deepspeed left
# out (it is built apart)
define OTHER_REQUIREMENTS
import importlib.metadata
from packaging.requirements import Requirement
for line in importlib.metadata.requires("vitpretrain"):
    req = Requirement(line)
    if req.name != "deepspeed" and (req.marker is None or req.marker.evaluate({"extra": "dev"})):
        req.marker = None
        print(req)
endef
export OTHER_REQUIREMENTS
DEEPSPEED := 0.19.8
INSTALLED_DEEPSPEED := import importlib.metadata as m; print(m.version("deepspeed"))
export INSTALLED_DEEPSPEED

install: $(STAMP)

$(STAMP): pyproject.toml setup.py data_pipeline/_jpeg_roi.c constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel packaging  # packaging: OTHER_REQUIREMENTS reads with it
	# torch first, pinned: an unpinned torch (directly or through a dependency) pulls a multi-GB CUDA build
	$(BIN)/pip install -q --no-compile -c constraints.txt torch==2.13.0
	# the bytecode of torch and its dependencies (sympy, networkx, ...), on every core (pip compiles on one); the one
	# file that only a newer Python reads is left out, as pip leaves it
	$(BIN)/python -m compileall -q -j0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		> /dev/null || true
	# this project, without its dependencies yet: its metadata lists them (OTHER_REQUIREMENTS)
	$(BIN)/pip install -q -c constraints.txt --no-deps -e '.[dev]'
	$(BIN)/python -c "$$OTHER_REQUIREMENTS" > $(VENV)/other-requirements.txt
	# deepspeed builds from an sdist that imports torch: build it against the torch just installed, with its CPU
	# shared-memory comm op compiled now (otherwise every fresh cache JIT-builds it at the first init, ~90 s, and
	# rebuilds it whenever a different `ninja` comes first on PATH); DS_ENABLE_NINJA compiles the op's two C++ files
	# side by side where `ninja` is on PATH (one after the other, as distutils does, where it is not). The build is
	# mostly C++ compiling and the other dependencies' install mostly unpacking: the wheel is built in the background
	# while they install (the build reads torch, which they leave alone: it is pinned), then installed.
	if [ "$$($(BIN)/python -c "$$INSTALLED_DEEPSPEED" 2>/dev/null)" = $(DEEPSPEED) ]; then \
		$(BIN)/pip install -q -c constraints.txt -r $(VENV)/other-requirements.txt; \
	else \
		rm -rf $(VENV)/wheels; \
		DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ENABLE_NINJA=1 DS_ACCELERATOR=cpu $(BIN)/pip wheel -q -c constraints.txt \
			--no-deps --no-build-isolation --no-cache-dir -w $(VENV)/wheels "deepspeed==$(DEEPSPEED)" \
			> $(VENV)/deepspeed-build.log 2>&1 & build=$$!; \
		$(BIN)/pip install -q -c constraints.txt -r $(VENV)/other-requirements.txt; others=$$?; \
		wait $$build || { cat $(VENV)/deepspeed-build.log; echo "make install: the deepspeed build failed (above)"; \
			exit 1; }; \
		test $$others = 0 && $(BIN)/pip install -q -c constraints.txt $(VENV)/wheels/deepspeed-*.whl; \
	fi
	$(BIN)/pip check
	# the JPEG crop decoder (C, optional) builds only where libjpeg-turbo's headers are; pip -q would not say so
	@$(BIN)/python -c "import data_pipeline._jpeg_roi" 2>/dev/null || echo "note: data_pipeline._jpeg_roi was not \
	built (no libjpeg-turbo headers? apt-get install libjpeg62-turbo-dev, then make install): JPEG crops will use \
	full-image decodes, 15-25% more CPU per train sample"
	touch $(STAMP)

# the whole suite on TEST_WORKERS pytest-xdist workers (one per core here), a test file per worker at a time (files
# share their module fixtures: trained runs, servers); TEST_WORKERS=0 runs it in this one process
TEST_WORKERS ?= 2
# The local Slurm starts (on a fresh machine: apt-get installs its packages first) while the venv installs; what it
# printed follows the install's output, and a Slurm that cannot start fails nothing here (the slurm tests say why).
test:
	@log=$$(mktemp); $(MAKE) --no-print-directory slurm-start > $$log 2>&1 & slurm=$$!; \
	$(MAKE) --no-print-directory bytecode; installed=$$?; wait $$slurm; cat $$log; rm -f $$log; exit $$installed
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 tests

# our modules' bytecode, written ahead: a shell with PYTHONDONTWRITEBYTECODE=1 (this machine's) otherwise compiles them
# again in every process the suite starts (launchers, ranks, helpers: ~0.1 s of CPU each); stale files are ignored
bytecode: install
	$(BIN)/python -m compileall -q pretrain launch data_pipeline tests benchmarks

# the inner loop: the unit tests (no Slurm, Ray or multi-rank training), two pytest workers (one per core here)
test-fast: bytecode
	$(BIN)/pytest -q -n 2 --durations=10 tests/unit

lint: install
	$(BIN)/ruff check pretrain launch data_pipeline tests benchmarks
	$(BIN)/ruff format --check pretrain launch data_pipeline tests benchmarks

format: install
	$(BIN)/ruff format pretrain launch data_pipeline tests benchmarks
	$(BIN)/ruff check --fix pretrain launch data_pipeline tests benchmarks

pretrain: install
	test -f $(DATA)/manifest.json || $(BIN)/pretrain data build digits --out $(DATA)
	$(BIN)/pretrain train $(PRETRAIN_CONFIG) data.path=$(DATA) $(ARGS) --nproc 2

# A real Slurm on this machine: 2 nodes (n1, n2: one slurmd each) by default; SLURM_NODES=1 make slurm-up for one node
slurm-up: install slurm-start

# slurm-up without the venv, which it does not use (make test starts it while the venv installs)
slurm-start:
	@if [ -x launch/local_slurm/start.sh ]; then bash launch/local_slurm/start.sh; else echo "local Slurm not available in this checkout"; fi

slurm-down:
	@if [ -x launch/local_slurm/stop.sh ]; then bash launch/local_slurm/stop.sh; fi

bench: install
	$(BIN)/python benchmarks/models.py

clean:
	rm -rf $(VENV) build *.egg-info
