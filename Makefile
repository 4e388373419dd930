# Two commands do all set-up from a fresh clone:
#   make book   install into .venv, then render the book to _build/html
#   make test   install into .venv, then pytest tests/ and nbval over every notebook in chapters/
#   make check-site   build the book, then load every page in headless Chromium (see tests/check_site.py)
#   make gpu-check    on one CUDA GPU: the prepared check (python -m moe_ref.bench gpu, < 8 min), results
#                     in chapters/data/gpu_results.json (python -m moe_ref.bench gpu --dry-run: its CPU plumbing)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install book mathjax check-site test test-py test-nb gpu-check clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

book: $(STAMP) mathjax
	$(BIN)/jupyter-book build . -W -n --keep-going

# MathJax is served from the built site, not a CDN, so the book works offline. The copy comes from a PyPI
# package (django-static-mathjax ships MathJax 3's es5 build); _config.yml adds _build/.mathjax to the
# static path and points mathjax_path at it. The speech-rule engine and the other combined builds are left out.
MATHJAX_DIR := _build/.mathjax/mathjax
mathjax: $(STAMP)
	rm -rf _build/.mathjax && mkdir -p _build/.mathjax
	cp -r "$$($(BIN)/python -c 'import mathjax, pathlib; print(pathlib.Path(list(mathjax.__path__)[0], "static", "mathjax", "es5"))')" $(MATHJAX_DIR)
	cd $(MATHJAX_DIR) && rm -rf sre tex-svg*.js tex-mml-*.js mml-*.js tex-chtml-full*.js node-main.js

# Chromium comes from Debian's package (a browser download is not possible here); installed if missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
check-site: book
	command -v chromium >/dev/null || command -v google-chrome >/dev/null || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null)
	$(BIN)/python tests/check_site.py --html _build/html --out _build/site-check

# Triton kernels (later chapters) run in Triton's CPU interpreter when torch sees no GPU. The variable must
# be set before any kernel is defined, so it is set here, for pytest and the notebook kernels it starts.
INTERPRET = TRITON_INTERPRET=$${TRITON_INTERPRET:-$$($(BIN)/python -c 'import torch; print(int(not torch.cuda.is_available()))')}

test: $(STAMP)
	$(INTERPRET) $(BIN)/python -m pytest tests chapters --nbval-lax --nbval-current-env -p no:cacheprovider

test-py: $(STAMP)
	$(INTERPRET) $(BIN)/python -m pytest tests -p no:cacheprovider

test-nb: $(STAMP)
	$(INTERPRET) $(BIN)/python -m pytest chapters --nbval-lax --nbval-current-env -p no:cacheprovider

# Needs a CUDA GPU (exits with status 2 without one); the kernels run natively, TRITON_INTERPRET is not set.
gpu-check: $(STAMP)
	$(BIN)/python -m moe_ref.bench gpu --out chapters/data/gpu_results.json

clean:
	rm -rf _build
