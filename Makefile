# Two commands set everything up on a fresh clone: `make demo` and `make test`.
# Both depend on `install`, which creates .venv here and installs vlmft into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on the dev/CI machines' disk. Used only when the Python
# that makes the venv has no torch of its own; GPU nodes bring theirs and it is kept.
TORCH_CPU := torch==2.13.0

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "keeping the torch importable from $(PYTHON): $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q -e '.[test,wandb,plot,peft]'
	@touch $@

# The held-out set before training (the base model), then training, which evaluates it again
# after its last step, with greedy answers (eval.generate).
demo: install
	$(BIN)/vlmft eval recipes/demo.yaml output_dir=runs/demo-base
	$(BIN)/vlmft train recipes/demo.yaml eval.generate=true --overwrite

test: install
	$(BIN)/python -m pytest -q

# Everything but the multi-process tests (torchrun + DeepSpeed): about 3 min here.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
