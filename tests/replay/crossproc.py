"""Record bundles in a fresh process (used by test_cross_process.py).

python crossproc.py record MODEL OUT PROMPT MAX_NEW_TOKENS [MODEL OUT PROMPT MAX_NEW_TOKENS …]
"""

from __future__ import annotations

import sys

from model_forensics.models.loading import load
from model_forensics.recorder import RecorderHooks
from model_forensics.recorder.session import record_prompt


def main(jobs: list[str]) -> None:
    for i in range(0, len(jobs), 4):
        model, out, prompt, new = jobs[i : i + 4]
        loaded = load(model, progress=False)
        recorder = RecorderHooks(granularity="layer", sketch="fp16")
        record_prompt(loaded, prompt, out, recorder=recorder, max_new_tokens=int(new))


if __name__ == "__main__":
    assert sys.argv[1] == "record", __doc__
    main(sys.argv[2:])
