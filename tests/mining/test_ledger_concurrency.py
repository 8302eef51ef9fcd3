"""Several processes recording on one node's ledger at once (real SQLite file, real processes):
every transaction lands in exactly one block, heights are contiguous, the chain verifies."""

import subprocess
import sys

from .chain_helpers import REPO, Instance

WRITER = """
import sys
from mining import ledger
for i in range(int(sys.argv[-1])):
    ledger.record("submission", {"writer": sys.argv[-2], "i": i})
"""

CHECK = """
import json
from mining import ledger
from mining.models import Block, Transaction
report = ledger.verify_chain()
print(json.dumps({"ok": report.ok, "problem": report.problem,
                  "heights": list(Block.objects.filter(origin__isnull=True).order_by("height").values_list("height", flat=True)),
                  "txs": sorted([t["writer"], t["i"]] for t in Transaction.objects.values_list("payload", flat=True))}))
"""


def test_concurrent_writers_never_fork_or_lose_a_transaction(tmp_path):
    node = Instance(tmp_path)
    node.manage("migrate", "--noinput", "-v", "0")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writers = [
        subprocess.Popen([sys.executable, "manage.py", "shell", "-c",
                          f"import sys; sys.argv += ['w{n}', '40']; exec(open({str(script)!r}).read())"],
                         cwd=REPO, env=node.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(3)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err[-2000:]
    result = node.run_script(CHECK)
    assert result["ok"], result["problem"]
    assert result["heights"] == list(range(1, 121))
    assert result["txs"] == sorted([f"w{n}", i] for n in range(3) for i in range(40))
