"""Secret volumes for the fake kubelet: written to their mountPath when it lies under the temp dir.

Processes see the host's filesystem, so a volume cannot be mounted where a real kubelet would put it;
a test that needs one mounts it under the temp dir, and the files appear there as a kubelet would make
them (each key a file, or `items` as key -> path), read through the API server when the container
starts. Other mount paths stay unmounted: the host's filesystem is not the harness's to write.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from api_client import Api
from container_env import object_data


def write_secret_volumes(api: Api, pod: dict, container: dict) -> list[Path]:
    """Writes the Secret volumes `container` mounts under the temp dir; the folders written."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    root = Path(tempfile.gettempdir()).resolve()
    written = []
    for mount in container.get("volumeMounts") or []:
        secret = volumes.get(mount["name"], {}).get("secret")
        target = Path(mount["mountPath"]).resolve()
        if not secret or root not in target.parents:
            continue
        data = object_data(api, "secrets", pod["metadata"]["namespace"], secret["secretName"])
        paths = {item["key"]: item["path"] for item in secret["items"]} if secret.get("items") else {k: k for k in data}
        target.mkdir(parents=True, exist_ok=True)
        for key, path in paths.items():
            (target / path).write_text(data[key])
        written.append(target)
    return written
