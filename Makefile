# Two entry points for a fresh clone: `make demo` and `make test`.
# torch goes in first, pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build.
# On a GPU machine override it, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

DEMO_OUT ?= runs/demo
DEMO_PRESET ?= mixgrpo
DEMO_ARGS ?=

.PHONY: venv install dev demo test test-slow lint clean parity

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	touch $@

venv: $(VENV)/.created

$(VENV)/.dev: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e ".[dev]"
	touch $@

dev: $(VENV)/.dev

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: MixGRPO on the shipped tiny model (DEMO_PRESET=awm,
# nft, dance-grpo, ... runs another preset). An earlier runs/demo is kept, renamed with a timestamp.
demo: install
	@if [ -e $(DEMO_OUT) ]; then mv $(DEMO_OUT) $(DEMO_OUT).$$(date +%Y%m%d-%H%M%S); fi
	$(VENV)/bin/mixgrpo train --preset $(DEMO_PRESET) --out $(DEMO_OUT) --set model.dtype=bfloat16 $(DEMO_ARGS)
	@echo "pictures: $(DEMO_OUT)/samples/  curves: $(DEMO_OUT)/reward_curve.png $(DEMO_OUT)/eval_curve.png"

# pytest exits 5 when it collects nothing; that must fail, and it does (non-zero).
test: dev
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q -m "not slow"

test-slow: dev
	$(PY) -m pytest -q -m slow

# Parity of our HPS-v2.1 / ImageReward scorers with the official packages. Those need
# torchvision, whose only build here is a CUDA one that breaks the CPU torch of .venv, so they
# get their own venv (~5.6 GB). Writes tests/parity/reference.json for the default suite.
OFFICIAL_VENV ?= .venv-official
# image-reward imports transformers APIs removed after 4.38 and needs `clip` + pkg_resources;
# the hpsv2 wheel lacks its BPE file (open_clip ships the same one).
OFFICIAL_PINS := "transformers==4.38.2" "huggingface_hub==0.24.7" "datasets==2.18.0" "diffusers==0.27.2" \
	"peft==0.10.0" "accelerate==0.30.1" openai-clip "setuptools>=77,<81"
$(OFFICIAL_VENV)/.created:
	$(PYTHON) -m venv $(OFFICIAL_VENV)
	$(OFFICIAL_VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(OFFICIAL_VENV)/bin/pip install --quiet hpsv2 image-reward open-clip-torch
	$(OFFICIAL_VENV)/bin/pip install --quiet --no-deps -e .
	$(OFFICIAL_VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 $(OFFICIAL_PINS) pyyaml scipy safetensors
	cp $(OFFICIAL_VENV)/lib/python3*/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz \
	   $(OFFICIAL_VENV)/lib/python3*/site-packages/hpsv2/src/open_clip/
	touch $@

# step 1 (official packages) writes the reference; step 2 checks ours against it in .venv
parity: $(OFFICIAL_VENV)/.created dev
	$(OFFICIAL_VENV)/bin/python scripts/parity.py
	$(PY) -m pytest -q tests/test_parity_reference.py

lint: dev
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
