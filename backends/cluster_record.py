"""DIR/cluster.json: where a local or Ray cluster's parts are reached (controller, frontend port, Ray address).

`moectl` writes it at `up`; the controller process rewrites it when a port it was handed turns out taken
(another process bound it between the pick and the bind) or when the frontend took any free one. Every
write replaces the file whole, so a reader never sees half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "cluster.json"


def read(directory: Path) -> dict:
    return json.loads((directory / FILE).read_text())


def write(directory: Path, record: dict) -> None:
    path = directory / FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def update(directory: Path, **changes) -> dict:
    record = read(directory) | changes
    write(directory, record)
    return record
