# webclip — every command a user needs. `make help` lists them.
#
# Each target creates (or reuses) the virtual environment in .venv first, so
# `make demo` and `make test` work on a fresh clone.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-webclip

# Stage targets run the stage with its own defaults, a config file given as CONFIG=file.yaml
# (keys are the options of `python -m <stage> --help`) and flags in ARGS:
#   make ingest CONFIG=my.yaml ARGS="--processes_count 8"
# The demo's configs (configs/demo/) are used only by `make demo`, or when named:
#   make shards CONFIG=configs/demo/shards.yaml
ARGS ?=
PYTEST_ARGS ?=

# A Ray cluster's job server (http://HEAD:8265), from CLUSTER=, RAY_API_SERVER_ADDRESS or an
# http(s) RAY_ADDRESS: the data-stage targets (crawl, ingest, filter, shards) then submit the
# same command to it as a job (`ray job submit`: infra/ray/submit.py, infra/README.md) instead
# of running here. A RAY_ADDRESS of host:port (the GCS) runs the stage here, as that cluster's driver.
CLUSTER ?= $(or $(RAY_API_SERVER_ADDRESS),$(filter http://% https://%,$(RAY_ADDRESS)))
SUBMIT_ARGS ?=
STAGE_CONFIG = $(if $(CONFIG),--config $(CONFIG))
STAGE = $(if $(CLUSTER),$(PY) -m infra.ray.submit --address $(CLUSTER) $(SUBMIT_ARGS) -- python -m,$(PY) -m)

.DEFAULT_GOAL := help
.PHONY: help venv browser demo demo-web crawl ingest filter shards report verify train test cluster-test bench bench-peers clean-demo
.PHONY: classify eval export embed index search

help: ## list the targets
	@echo "webclip: web image-text data in, a CLIP model out"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'
	@echo
	@echo "Stage targets take CONFIG=file.yaml (default: none, the stage's own defaults) and ARGS=\"--flag value\";"
	@echo "the demo's configs are configs/demo/<stage>.yaml (make demo passes them itself)."
	@echo "CLUSTER=http://HEAD:8265 runs crawl/ingest/filter/shards as a job on that Ray cluster (infra/README.md)."

$(STAMP): pyproject.toml
	@echo "Setting up $(VENV) (the first time takes a few minutes: torch, ray, open_clip)..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP) ## create or update the virtual environment (.venv)

demo: $(STAMP) ## the whole path on the embedded demo web: corpus → ingest → filter → shards → train → zero-shot → search
	$(PY) -m infra.local.demo $(ARGS)

demo-web: $(STAMP) ## serve the demo web on 127.0.0.1:8765 (for running `make ingest` by hand)
	$(PY) -m infra.local.webserver --root data/demo/corpus/site --port $${DEMO_PORT:-8765}

crawl: $(STAMP) ## seed pages and/or WARC/WAT archives -> a URL list for ingest, on Ray (CONFIG=, ARGS=)
	$(STAGE) crawl $(STAGE_CONFIG) $(ARGS)

ingest: $(STAMP) ## download a URL list into pool shards: local processes, or Ray on a cluster (CONFIG=, ARGS=)
	$(STAGE) ingest $(STAGE_CONFIG) $(ARGS)

filter: $(STAMP) ## decide keep/reject with a reason for every pool row (CONFIG=, ARGS=)
	$(STAGE) filter $(STAGE_CONFIG) $(ARGS)

shards: $(STAMP) ## kept samples -> mixed train shards + manifest.json (+ the report), resumable (CONFIG=, ARGS=)
	$(STAGE) shards $(STAGE_CONFIG) $(ARGS)

report: $(STAMP) ## statistics report from metadata: index.html, report.json, datasheet.md (CONFIG=, ARGS=)
	$(PY) -m shards.report $(STAGE_CONFIG) $(ARGS)

verify: $(STAMP) ## recompute hashes and counts of train shards (or ARGS="--folder POOL"); exit 1 on damage
	$(PY) -m shards.verify $(STAGE_CONFIG) $(ARGS)

train: $(STAMP) ## train CLIP from train shards, then zero-shot evaluation (CONFIG=, ARGS=)
	$(PY) -m train $(STAGE_CONFIG) $(ARGS)

# -- using the model (apply/): ARGS="--checkpoint C ..."; `python -m apply.<command> --help` lists every option --
classify: $(STAMP) ## zero-shot labels for images: ARGS="--checkpoint C --images DIR --labels 'a,b,c' --output_file F"
	$(PY) -m apply.classify $(ARGS)

eval: $(STAMP) ## benchmark figures (CLIP_benchmark layout, ImageFolder): ARGS="--checkpoint C --datasets D1,D2 --output_file F.json"
	$(PY) -m apply.evaluate $(ARGS)

export: $(STAMP) ## a checkpoint as an open_clip hub folder: ARGS="--checkpoint C --output_folder D [--push_to_hub ORG/NAME]"
	$(PY) -m apply.export $(ARGS)

embed: $(STAMP) ## image and caption embeddings of pool or train shards (ARGS="--checkpoint C --shards S --output_folder E")
	$(PY) -m apply.embed $(ARGS)

index: $(STAMP) ## faiss index over an embeddings folder (ARGS="--embeddings E --output_folder I")
	$(PY) -m apply.index $(ARGS)

search: $(STAMP) ## search an index (ARGS="--index I --query TEXT --top_k K"), or serve the API and page (--serve)
	$(PY) -m apply.search $(ARGS)

browser: ## Debian's chromium for the report page's browser tests (installed once, needs root or sudo)
	@bash infra/local/install_chromium.sh

test: $(STAMP) browser ## unit and integration tests (real HTTP server, Ray, S3 server, torchrun, Chromium)
	$(PY) -m pytest $(PYTEST_ARGS)

cluster-test: $(STAMP) ## only the cluster tests: 2-node Ray and torchrun on loopback, node loss, infra/ configs
	$(PY) -m pytest tests/test_cluster_*.py $(PYTEST_ARGS)

bench-peers: ## the peers' own venvs under .bench/ (img2dataset 1.47, open_clip_train + webdataset 0.2.86)
	VENV=$(VENV) bash bench/peers.sh

bench: $(STAMP) bench-peers ## the benchmarks of BENCHMARKS.md (~40 min on 2 cores; the first run also makes the photo web, ~5 min)
	$(PY) -m bench.ingest_vs_img2dataset --repeat 2
	$(PY) -m bench.ingest_memory
	$(PY) bench/plan_memory.py
	$(PY) -m bench.train_vs_openclip --repeat 2

clean-demo: ## remove the demo's data and runs
	rm -rf data/demo runs/demo
