"""A container's environment as a kubelet builds it: envFrom, env values with $(VAR) expansion, and
valueFrom (fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef), read through the API server."""

from __future__ import annotations

import base64
import re

from api_client import Api, ApiError

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown kept, $$ is a literal $."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _REF.sub(sub, text)


def field_value(pod: dict, ip: str, path: str, *, node_name: str, host_ip: str) -> str:
    """A fieldRef's value for a pod running at `ip` on `node_name`; ValueError for paths not supported."""
    meta, spec = pod["metadata"], pod["spec"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    values = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
              "spec.nodeName": node_name, "spec.serviceAccountName": spec.get("serviceAccountName", ""),
              "status.podIP": ip, "status.podIPs": ip, "status.hostIP": host_ip, "status.hostIPs": host_ip}
    if path not in values:
        raise ValueError(f"fake kubelet: unsupported fieldRef {path!r}")
    return values[path]


def object_data(api: Api, kind: str, namespace: str, name: str) -> dict[str, str]:
    """A ConfigMap's data, or a Secret's decoded."""
    obj = api.request("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}")
    if kind == "secrets":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def container_env(api: Api, pod: dict, ip: str, spec: dict, *, node_name: str, host_ip: str,
                  capacity: dict[str, str]) -> dict[str, str]:
    """The variables the container `spec` of `pod` declares (the process's own environment comes first,
    from the caller); `capacity` is the node's, for resourceFieldRefs without a limit or request."""
    env: dict[str, str] = {}
    ns = pod["metadata"]["namespace"]
    for source in spec.get("envFrom") or []:
        for key, kind in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
            if key in source:
                try:
                    data = object_data(api, kind, ns, source[key]["name"])
                except ApiError as e:
                    if e.status == 404 and source[key].get("optional"):
                        continue
                    raise
                env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for var in spec.get("env") or []:
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = field_value(pod, ip, source["fieldRef"]["fieldPath"], node_name=node_name, host_ip=host_ip)
        elif "resourceFieldRef" in source:
            what, _, resource = source["resourceFieldRef"]["resource"].partition(".")
            resources = (spec.get("resources") or {}).get(what) or {}
            env[var["name"]] = str(resources.get(resource, capacity.get(resource, "0")))
        else:
            for key, kind in (("configMapKeyRef", "configmaps"), ("secretKeyRef", "secrets")):
                if key in source:
                    ref = source[key]
                    try:
                        data = object_data(api, kind, ns, ref["name"])
                    except ApiError as e:
                        if e.status == 404 and ref.get("optional"):
                            break
                        raise
                    if ref["key"] in data:
                        env[var["name"]] = data[ref["key"]]
                    elif not ref.get("optional"):
                        raise KeyError(f"key {ref['key']!r} not in {kind} {ns}/{ref['name']}")
    return env
