# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PY ?= python3
# ultralytics pulls opencv-python; the contrib wheel (selective search) installs the same cv2 module, so it must
# be installed last, every time, for cv2.ximgproc to exist.
OPENCV_CONTRIB = opencv-contrib-python-headless==5.0.0.93

.PHONY: install test demo bench
install:
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --force-reinstall --no-deps $(OPENCV_CONTRIB)

test: install
	$(PY) -m pytest -q tests

demo: install
	odis demo --out runs/demo

bench: install
	$(PY) benchmarks/step.py && $(PY) benchmarks/loader.py && $(PY) benchmarks/shard.py && $(PY) benchmarks/extract.py
