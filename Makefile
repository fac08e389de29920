# Quick start: `make demo` (set-up, then a streaming model trained on a real slide, then whole-slide
# predictions and heatmaps with it in results/demo/), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned: on our machines a CPU build of 2.13.0 lies on local disk, while an
# unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo demo-stream serve segmentation test bench bench-budget bench-slide bench-inference predict-large bench-vs-lightstream equivalence resolution slide-level clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/slide_demo.py

# The web page on http://127.0.0.1:8000 (this machine only), serving the demo model; `make demo`
# first when it has not been trained yet. Accounts, uploads and results go to results/serve/.
DEMO_CKPT := results/demo/model.ckpt
serve: venv
	test -f $(DEMO_CKPT) || $(MAKE) demo
	$(VENV)/bin/lightning-streaming serve --checkpoint $(DEMO_CKPT) --model examples.slide_demo:SlideClassifier \
		--host 127.0.0.1 --port 8000 --data-dir results/serve

demo-stream: venv
	$(PY) examples/stream_demo.py

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/memory_speed.py

# Conventional against streamed within half the conventional peak (about two hours on 2 cores).
bench-budget: venv
	$(PY) benchmarks/budget_speed.py

# lightstream 1.0.7 in its own venv under results/peers (never one of our dependencies).
bench-vs-lightstream: venv
	bash benchmarks/peers/setup_lightstream.sh
	$(PY) benchmarks/vs_lightstream.py

bench-slide: venv
	$(PY) scripts/large_slide_step.py --size 20480 --memory-limit 4

# A whole U-Net streamed: dense prediction at the slide's resolution (a few minutes; results/segmentation/).
segmentation: venv
	$(PY) examples/segmentation.py

# Streamed no-grad prediction against the conventional forward (VGG-like, ResNet-18 body, 4096²).
bench-inference: venv
	$(PY) benchmarks/inference_speed.py

# Prediction and a saliency heatmap of the generated 51200 x 51200 slide in bounded memory.
predict-large: venv
	$(PY) scripts/large_slide_predict.py

# The paper's experiments in miniature (each a few minutes on 2 CPU cores; tables and plots in results/).
equivalence: venv
	$(PY) -m examples.equivalence

resolution: venv
	$(PY) examples/resolution/run.py

slide-level: venv
	$(PY) examples/slide_level/camelyon_like.py
	$(PY) examples/slide_level/tupac_like.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache results .data
