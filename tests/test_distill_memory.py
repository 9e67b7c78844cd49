"""fused_linear_kd_loss on the cpu backend holds O(chunk × V), not [N, V]: its peak extra resident
memory for forward + backward is compared with that of materialising both logits.

Each form runs in a fresh interpreter, which resets its RSS high-water mark (VmHWM, through
/proc/self/clear_refs) just before the call, so the mark holds that call's peak only (the lifetime
ru_maxrss also caught earlier peaks and made the fused figure vary from 160 to 550 MiB). Run with
-s to see both numbers.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import collab_ops
from collab_ops import _availability

N, HIDDEN, VOCAB = 4096, 256, 32000
MAX_FUSED_TO_NAIVE = 0.25

# Prints {"extra_bytes": peak RSS during forward + backward minus the RSS just before it}.
MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    import collab_ops

    form, n, hidden, vocab = sys.argv[1], *map(int, sys.argv[2:])

    def status_bytes(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def inputs(n, hidden, vocab):
        g = torch.Generator().manual_seed(0)
        student_hidden = torch.randn(n, hidden, generator=g).requires_grad_()
        student_weight = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_()
        teacher_hidden = torch.randn(n, hidden, generator=g)
        teacher_weight = torch.randn(vocab, hidden, generator=g) * hidden**-0.5
        labels = torch.randint(0, vocab, (n,), generator=g)
        return student_hidden, student_weight, teacher_hidden, teacher_weight, labels

    def run(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
        options = dict(divergence="jsd", hard_weight=0.5)
        if form == "naive":
            with torch.no_grad():
                teacher_logits = F.linear(teacher_hidden, teacher_weight)
            student_logits = F.linear(student_hidden, student_weight)
            loss = collab_ops.kd_loss(student_logits, teacher_logits, labels, backend="cpu", **options)
        else:
            loss = collab_ops.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                   labels, backend="cpu", **options)
        loss.backward()

    run(*inputs(8, hidden, 64))  # loads libraries and starts thread pools outside the measurement
    case = inputs(n, hidden, vocab)
    # Resets the high-water mark (VmHWM) to the current RSS, so that it covers this call only.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = status_bytes("VmRSS")
    run(*case)
    print(json.dumps({"extra_bytes": status_bytes("VmHWM") - before}))
""")


def peak_extra_bytes(form: str) -> int:
    # the child imports the same collab_ops as this process
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(collab_ops.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))

    result = subprocess.run(
        [sys.executable, "-c", MEASURE, form, str(N), str(HIDDEN), str(VOCAB)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.skipif(_availability.extension() is None, reason="the C++ extension is not built")
def test_fused_cpu_peak_memory_is_a_fraction_of_materialised_logits():
    naive = peak_extra_bytes("naive")
    fused = peak_extra_bytes("fused")
    mib = 2**20
    print(f"\nforward+backward N={N} H={HIDDEN} V={VOCAB} fp32, peak extra RSS: "
          f"materialised logits {naive / mib:.0f} MiB, fused cpu {fused / mib:.0f} MiB ({fused / naive:.2f}×)")
    assert fused <= MAX_FUSED_TO_NAIVE * naive
