#!/usr/bin/env bash
# Run HERE (a machine with the package registry and .venv), once, before perf/gpu/run.sh goes to the GPU:
#
#   bash perf/gpu/prepare.sh        # -> .whl/ (~45 MB of wheels) and .perf/tokenizer/ (~3.5 MB)
#
# The wheels are LLaMA-Factory's (../shared/device/fetch-wheels.sh, see ../shared/device/README.md) plus what
# our code imports beyond the GPU image: pydantic (src/params.py), and jieba, nltk and rouge-chinese, which
# LLaMA-Factory's do_predict needs for its metrics (perf_eval.py). jieba has no wheel on PyPI: built here.
# The tokenizer is the embedded SmolLM2 one (model weights can't travel: over 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
for d in /.whl/ /.perf/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
bash ../shared/device/fetch-wheels.sh pydantic==2.12.3 pydantic-core==2.41.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 nltk==3.10.4 rouge-chinese==1.0.3
ls .whl/jieba-0.42.1-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps jieba==0.42.1 -w .whl
.venv/bin/python perf/perf_train.py --export-tokenizer .perf/tokenizer
du -sh .whl .perf
echo "now, on the GPU machine (carry .whl and .perf): bash perf/gpu/run.sh"
