# peft-bench. Every target installs what is missing first: `.venv` is (re)built whenever it is
# absent or pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

METHOD ?= linear
TASKS ?= all
SEEDS ?= 42,44,82,100,800
DATA ?= $(or $(VTAB_ROOT),$(HOME)/.cache/peft-bench/vtab-1k)
RESULTS ?= results/bench
ARGS ?=

DEMO_DATA ?= $(HOME)/.cache/peft-bench/demo-data
DEMO_RESULTS ?= results/demo
DEMO_TASKS := cifar100,camelyon,eurosat,clevr_count
DEMO_ARGS := --backbone test_vit --no-pretrained --image-size 64 --epochs 15 --batch-size 32 --seeds 42,44

.PHONY: install test demo bench leaderboard lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m benchmark synth --out $(DEMO_DATA) --tasks $(DEMO_TASKS) --per-class 8 --image-size 64 --seed 0
	$(PY) -m benchmark bench --method linear --lr 0.05 --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS)
	$(PY) -m benchmark bench --method full --lr 0.01 --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS)
	$(PY) -m benchmark bench --method vpt_shallow --set num_tokens=8 --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS)
	$(PY) -m benchmark bench --method vpt_deep --set num_tokens=8 --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS)
	$(PY) -m benchmark bench --method convpass --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS)
	$(PY) -m benchmark bench --method convpass_attn --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS)
	$(PY) -m benchmark bench --method pgn --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS)
	$(PY) -m benchmark bench --method lion --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS) --seeds 42 --set lipschitz=kernel
	$(PY) -m benchmark bench --method e2vpt --set max_token_levels=2 --set max_segment_levels=2 --tasks $(DEMO_TASKS) --data-root $(DEMO_DATA) --results $(DEMO_RESULTS) $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) -m benchmark bench --method $(METHOD) --tasks $(TASKS) --seeds $(SEEDS) --data-root $(DATA) --results $(RESULTS) $(ARGS)

leaderboard: $(STAMP)
	$(PY) -m benchmark leaderboard --results $(RESULTS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
