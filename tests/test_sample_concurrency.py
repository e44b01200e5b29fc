"""Every shipped sample written on first use is safe when several runs create it at the same moment:
processes started together all succeed, the result is complete and readable, nothing temporary is left."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: pack sample -> (code writing it into sys.argv[1], code checking the result in sys.argv[1])
WRITERS = {
    "detection": ("from domains.medical.detection_sample import write_detection_sample as w; "
                  "w(sys.argv[1], n_train=8, n_val=4, size=64)",
                  "import json; d = json.loads((out / 'annotations' / 'instances_val.json').read_text()); "
                  "assert len(d['images']) == 4 and len(list((out / 'images' / 'train').glob('*.png'))) == 8"),
    "radio_astronomy": ("from domains.radio_astronomy.sample import write_sample as w; "
                        "w(sys.argv[1], per_batch=4, n_test=4)",
                        "from domains.radio_astronomy.sample import is_complete; "
                        "from domains.radio_astronomy.mirabest import read_batch, TEST_BATCH; "
                        "assert is_complete(out / 'batches') and len(read_batch(out / 'batches' / TEST_BATCH).codes) == 4"),
    "surgery_video": ("from domains.surgery_video.sample import write_sample as w; "
                      "w(sys.argv[1], n_videos=2, min_seconds=21, max_seconds=21, size=16)",
                      "assert len(list((out / 'phase_annotations').glob('*-phase.txt'))) == 2"),
    "new_domain_template": ("from vision_ft.pack_template.starter.sample import write_sample as w; w(sys.argv[1])",
                            "from vision_ft.pack_template.starter.sample import is_complete; assert is_complete(out)"),
}

_RACER = """
import sys, time
start = float(sys.argv[2])
while time.time() < start:
    pass
{write}
"""


@pytest.mark.subprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sample", sorted(WRITERS))
def test_processes_writing_one_sample_at_once_all_succeed(sample, tmp_path):
    write, check = WRITERS[sample]
    out = tmp_path / "sample"
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _RACER.format(write=write), str(out), str(start)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-1500:] for e in errors)
    exec(check, {"out": out})
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"] and not leftovers, leftovers
