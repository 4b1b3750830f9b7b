"""Derive ``klaviyo_sandbox/schema/klaviyo-<revision>.json`` from Klaviyo's full OpenAPI spec.

    python scripts/derive_klaviyo_schema.py [--spec ../shared/klaviyo/stable.json] [--check]

Only the operations the sandbox emulates are kept, prose is stripped, and the source path, its sha256 and the
spec revision are recorded in ``provenance``. ``--check`` exits 1 when the shipped file differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klaviyo_sandbox.schema.derive import SPEC_SOURCE, derive_file, find_shared_spec  # noqa: E402


def main() -> int:
    """Write (or with ``--check`` compare) the compact schema file."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", help=f"path of stable.json (default: {SPEC_SOURCE}, searched upwards)")
    parser.add_argument("--check", action="store_true", help="only compare with the shipped file")
    args = parser.parse_args()
    spec_path = Path(args.spec).resolve() if args.spec else find_shared_spec(ROOT)
    if spec_path is None or not spec_path.is_file():
        print(f"error: spec not found ({args.spec or SPEC_SOURCE}); pass --spec PATH", file=sys.stderr)
        return 2
    # The recorded source is the conventional location, not this machine's path, so every checkout derives
    # the same bytes.
    revision, text = derive_file(spec_path, SPEC_SOURCE)
    target = ROOT / "klaviyo_sandbox" / "schema" / f"klaviyo-{revision}.json"
    if args.check:
        same = target.is_file() and target.read_text(encoding="utf-8") == text
        print(f"{target.relative_to(ROOT)}: {'up to date' if same else 'DIFFERS'}")
        return 0 if same else 1
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target.relative_to(ROOT)} ({len(text):,} bytes, revision {revision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
