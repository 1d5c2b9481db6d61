# `make demo`: set up .venv, train the small SegViT on the built-in synthetic data, evaluate it
# and write overlay pictures. `make test`: set up .venv with the test extras and run pytest.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
# Test files spread over the cores (pytest-xdist; a file's tests stay in one process, so its
# module fixtures are built once), at most 4 processes (each holds its own JAX caches), in
# collection order: the longest files first (tests/conftest.py).
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

.PHONY: demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime install; the stamp keeps reruns instant.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# torch first (CPU build at this exact pin), then everything else constrained to it, then
# jax2onnx without its dependencies (its orbax-checkpoint<0.11.37 pin would downgrade ours;
# `pip check` then reports that pin, and only that).
$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps jax2onnx==0.17.1  # (pyproject.toml, the export extra)
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/python train.py --config configs/demo.py --workdir $(DEMO_DIR)
	$(BIN)/python eval.py --config configs/demo.py --workdir $(DEMO_DIR)
	$(BIN)/python -m segvit_jax.export_bundle --workdir $(DEMO_DIR) --output $(DEMO_DIR)/bundle --overwrite
	$(BIN)/python -m segvit_jax.data.synthetic --output $(DEMO_DIR)/samples --split val --num 4
	$(BIN)/python predict.py --checkpoint $(DEMO_DIR)/bundle --input $(DEMO_DIR)/samples/images/val \
	  --output $(DEMO_DIR)/predictions

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
