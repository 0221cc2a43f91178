# The two commands:  `make book` (set up, build the mini world, execute the notebooks, build the HTML)
#                    `make test` (set up, run the unit tests and the nbval notebook checks)
VENV   ?= .venv
BIN    := $(VENV)/bin
PRESET ?= cpu
# processes at a time for `make book`, each with one thread (0: one per core)
WORKERS ?= 0
NB     ?= 00_world
PARAMS ?=

export BVLIB_STORE ?= $(CURDIR)/.bvlib/store
export BVLIB_CACHE ?= $(CURDIR)/.bvlib/data
export HF_HUB_OFFLINE := 1
unexport MPLBACKEND

.PHONY: setup book notebook readme publish html world test unit nbval baselines bench lint clean device-wheels device-check

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

book: setup            ## the main result: the book in _build/html/index.html
	$(BIN)/bvlib book --preset $(PRESET) --workers $(WORKERS)

notebook: setup        ## re-run one notebook: make notebook NB=00_world PARAMS="-p show_samples false"
	$(BIN)/bvlib notebook $(NB) --preset $(PRESET) $(PARAMS)
	$(BIN)/bvlib book --html-only

publish: setup         ## the built book onto a local gh-pages branch (ghp-import, not pushed): git push origin gh-pages publishes it
	$(BIN)/bvlib publish

readme: setup          ## the README's results block from this build's book/results (and its snapshot in benchmarks/results)
	$(BIN)/bvlib readme

html: setup
	$(BIN)/bvlib book --html-only

world: setup
	$(BIN)/bvlib world --preset $(PRESET)

test: setup            ## unit tests + end-to-end tests + nbval against the smoke baselines
	$(BIN)/python -m pytest
	BVLIB_RESULTS=$(CURDIR)/.bvlib/nbval-results $(BIN)/python -m pytest --nbval tests/notebooks \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

unit: setup
	$(BIN)/python -m pytest -m "not slow"

baselines: setup       ## re-execute the smoke baselines that nbval compares against
	BVLIB_RESULTS=$(CURDIR)/.bvlib/nbval-results $(BIN)/python -m tests.make_baselines

bench: setup
	$(BIN)/python benchmarks/bench_world.py

device-wheels: setup  ## the pure-Python wheels a GPU machine with torch lacks, into .whl/ (carried to it)
	mkdir -p .whl && $(BIN)/python -m pip download -q --no-deps -d .whl open_clip_torch==3.3.0 ftfy wcwidth

device-check:          ## on a GPU machine with torch (no venv, no network): the prepared check of the GPU path
	[ ! -d .whl ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/bvlib-site .whl/*.whl
	PYTHONPATH=$(CURDIR):/tmp/bvlib-site PYTHONUNBUFFERED=1 python3 scripts/device_check.py $(if $(OUT),--out $(OUT)/device-check.json) $(if $(SKIP),--skip $(SKIP))

lint: setup            ## format the code at pyproject's line length, then lint it
	$(BIN)/ruff format bvlib tests benchmarks notebooks scripts
	$(BIN)/ruff check bvlib tests benchmarks notebooks scripts

clean:
	rm -rf _build book/*.ipynb book/results
