"""Where a bench writes its result: `<out>/<kind>-<UTC stamp>.json`, named by when it ran."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def write_result(out: Path, kind: str, data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
