"""What the Python runners share: the orders, the blocks, the report."""
import contextlib
import json
import os
import traceback

# (order number, amount, deliveries): LIMIT refuses order 3 (idem_fail).
ORDERS = [(1, 500, 3), (2, 1200, 1), (3, 15000, 2), (4, 700, 2), (5, 900, 3), (6, 300, 1)]
LIMIT = 10_000
HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.environ.get("DRIVERS_DOC") or os.path.normpath(os.path.join(HERE, "..", "..", "docs", "drivers.md"))
SNIPPETS = os.path.join(HERE, "build", "snippets")


def order_base(run_id, driver_no):
    """Order ids of one driver in one run: base + 1..6 for ORDERS, base + 90
    for the order whose key another role claimed (test.sh)."""
    return run_id * 10000 + driver_no * 100


class Blocks:
    def __init__(self):
        with open(os.path.join(SNIPPETS, "manifest.json"), encoding="utf-8") as f:
            self.manifest = {b["name"]: b for b in json.load(f)}

    def code(self, name):
        if name not in self.manifest:
            raise LookupError(f"no block marked '<!-- test: {name} -->' in docs/drivers.md")
        with open(os.path.join(SNIPPETS, name + ".txt"), encoding="utf-8") as f:
            return f.read()

    def run(self, *names, ns=None):
        """Executes the blocks in order in one namespace (a new one unless
        given), as the document shows them; returns the namespace."""
        ns = {"__name__": "drivers_md"} if ns is None else ns
        for name in names:
            code = self.code(name)
            line = self.manifest[name]["line"]
            print(f"RAN {name}", flush=True)
            exec(compile("\n" * (line - 1) + code, DOC, "exec"), ns)
        return ns


class Report:
    def __init__(self):
        self.failed = 0

    def check(self, name):
        def run(fn):
            try:
                detail = fn()
            except Exception as e:  # noqa: BLE001
                self.failed += 1
                tb = traceback.format_exc().strip().splitlines()
                detail = "\n    ".join(tb[-12:])
                print(f"FAIL {name}: {type(e).__name__}: {e}\n    {detail}", flush=True)
            else:
                print(f"PASS {name}" + (f" ({detail})" if isinstance(detail, str) else ""), flush=True)
        return run

    @contextlib.contextmanager
    def section(self, name):
        try:
            yield
        except Exception as e:  # noqa: BLE001
            self.failed += 1
            tb = "\n    ".join(traceback.format_exc().strip().splitlines()[-15:])
            print(f"FAIL {name}: the section stopped: {type(e).__name__}: {e}\n    {tb}", flush=True)

    def exit_code(self):
        return 1 if self.failed else 0
