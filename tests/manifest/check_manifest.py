"""Checks Documentation/kube-flannel-ebpf.yml offline.

1. Every document against the Kubernetes OpenAPI schemas that `kubernetes-validate` bundles
   (strict: unknown fields are errors), for KUBERNETES_VERSION.
2. The deployment contract, field by field: what flannel's kube-flannel.yml (v0.28.x) has, with our
   image, plus what the eBPF dataplane needs and nothing more.
3. A few rules the API server enforces but the schemas do not (Bidirectional propagation only in
   privileged containers, mounts naming declared volumes, unique names).

Usage: check_manifest.py MANIFEST. Prints every failure and exits 1 if there is any.
"""

import json
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"

AGENT_IMAGE = "ghcr.io/flannel-ebpf/flannel-agent:v0.1.0"
FLANNEL_IMAGE = "ghcr.io/flannel-io/flannel:v0.28.9"
CNI_PLUGIN_IMAGE = "ghcr.io/flannel-io/flannel-cni-plugin:v1.9.1-flannel3"

# flannel's ConfigMap data, byte for byte (v0.28.x).
CNI_CONF = """{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"""
NET_CONF = """{
  "Network": "10.244.0.0/16",
  "EnableNFTables": false,
  "Backend": {
    "Type": "vxlan"
  }
}
"""
NET_CONF_VALUE = {"Network": "10.244.0.0/16", "EnableNFTables": False, "Backend": {"Type": "vxlan"}}

BPFFS_SCRIPT = "grep -q '^[^ ]* /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf"

failures = []
checks = 0


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        failures.append(what)
    return cond


def eq(actual, expected, what):
    return check(actual == expected, f"{what}: expected {expected!r}, found {actual!r}")


def get(obj, *path):
    """obj[path[0]][path[1]]..., None where absent."""
    for key in path:
        if isinstance(obj, dict):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def by_name(items, name):
    return next((i for i in items or [] if isinstance(i, dict) and i.get("name") == name), None)


def validate_schemas(docs):
    for i, doc in enumerate(docs):
        what = f"document {i} ({get(doc, 'kind')}/{get(doc, 'metadata', 'name')})"
        try:
            # Returns the schemas' major.minor: an older one if the bundle lacks ours.
            used = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            eq(used, KUBERNETES_VERSION.rsplit(".", 1)[0], f"{what}: schema version used")
        except kubernetes_validate.utils.VersionNotSupportedError:
            check(False, f"{what}: kubernetes-validate has no schemas for {KUBERNETES_VERSION}")
        except kubernetes_validate.ValidationError as e:
            # The first error of the document (what kubernetes-validate reports).
            check(False, f"{what}: schema ({KUBERNETES_VERSION}, strict): {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            check(False, f"{what}: no schema: {e}")
        except kubernetes_validate.InvalidSchemaError as e:
            check(False, f"{what}: invalid schema: {e}")


def check_namespace(ns):
    eq(get(ns, "metadata", "labels", "pod-security.kubernetes.io/enforce"), "privileged",
       "Namespace label pod-security.kubernetes.io/enforce")
    eq(get(ns, "metadata", "labels", "k8s-app"), "flannel", "Namespace label k8s-app")


def check_rbac(role, binding, sa):
    rules = {}
    for rule in get(role, "rules") or []:
        check(rule.get("apiGroups") == [""], f"ClusterRole rule {rule}: apiGroups must be [\"\"]")
        for resource in rule.get("resources") or []:
            rules.setdefault(resource, []).extend(rule.get("verbs") or [])
    eq({r: sorted(v) for r, v in rules.items()},
       {"pods": ["get"], "nodes": ["get", "list", "watch"], "nodes/status": ["patch"]},
       "ClusterRole flannel rules (resource: verbs)")
    eq(get(binding, "roleRef"),
       {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "flannel"},
       "ClusterRoleBinding roleRef")
    eq(get(binding, "subjects"),
       [{"kind": "ServiceAccount", "name": "flannel", "namespace": "kube-flannel"}],
       "ClusterRoleBinding subjects")
    eq(get(sa, "metadata", "namespace"), "kube-flannel", "ServiceAccount namespace")


def check_configmap(cm):
    eq(get(cm, "metadata", "namespace"), "kube-flannel", "ConfigMap namespace")
    eq(get(cm, "metadata", "labels"), {"tier": "node", "k8s-app": "flannel", "app": "flannel"},
       "ConfigMap labels")
    data = get(cm, "data") or {}
    eq(sorted(data), ["cni-conf.json", "net-conf.json"], "ConfigMap data keys")
    for key, expected in [("cni-conf.json", CNI_CONF), ("net-conf.json", NET_CONF)]:
        text = data.get(key)
        eq(text, expected, f"ConfigMap {key} (byte-identical to flannel's)")
        try:
            value = json.loads(text or "")
        except ValueError as e:
            check(False, f"ConfigMap {key} is not JSON: {e}")
            continue
        if key == "net-conf.json":
            eq(value, NET_CONF_VALUE, "net-conf.json value")
        else:
            eq([p.get("type") for p in value.get("plugins", [])], ["flannel", "portmap"],
               "cni-conf.json plugin types")


def check_mount(container, name, path, propagation=None, read_only=None):
    what = f"container {container.get('name')}: mount {name}"
    mount = by_name(container.get("volumeMounts"), name)
    if not check(mount is not None, f"{what}: missing"):
        return
    eq(mount.get("mountPath"), path, f"{what} mountPath")
    eq(mount.get("mountPropagation"), propagation, f"{what} mountPropagation")
    eq(mount.get("readOnly"), read_only, f"{what} readOnly")


def check_init_containers(spec):
    inits = spec.get("initContainers") or []
    eq([c.get("name") for c in inits], ["install-cni-plugin", "install-cni", "mount-bpffs"],
       "initContainers (in order)")
    plugin = by_name(inits, "install-cni-plugin") or {}
    eq(plugin.get("image"), CNI_PLUGIN_IMAGE, "install-cni-plugin image")
    eq(plugin.get("command"), ["cp"], "install-cni-plugin command")
    eq(plugin.get("args"), ["-f", "/flannel", "/opt/cni/bin/flannel"], "install-cni-plugin args")
    check_mount(plugin, "cni-plugin", "/opt/cni/bin")
    eq(len(plugin.get("volumeMounts") or []), 1, "install-cni-plugin mount count")

    cni = by_name(inits, "install-cni") or {}
    eq(cni.get("image"), FLANNEL_IMAGE, "install-cni image")
    eq(cni.get("command"), ["/opt/bin/install-conf"], "install-cni command")
    eq(cni.get("args"),
       ["/etc/kube-flannel/cni-conf.json", "/etc/cni/net.d/10-flannel.conflist"],
       "install-cni args")
    check_mount(cni, "cni", "/etc/cni/net.d")
    check_mount(cni, "flannel-cfg", "/etc/kube-flannel/")
    eq(len(cni.get("volumeMounts") or []), 2, "install-cni mount count")

    bpffs = by_name(inits, "mount-bpffs") or {}
    eq(bpffs.get("image"), CNI_PLUGIN_IMAGE, "mount-bpffs image (busybox sh, grep, mount)")
    eq(bpffs.get("command"), ["/bin/sh", "-c", BPFFS_SCRIPT], "mount-bpffs command")
    eq(get(bpffs, "securityContext", "privileged"), True,
       "mount-bpffs privileged (mount, and Bidirectional propagation)")
    check_mount(bpffs, "bpffs", "/sys/fs/bpf", propagation="Bidirectional")
    eq(len(bpffs.get("volumeMounts") or []), 1, "mount-bpffs mount count")


def check_agent(spec):
    containers = spec.get("containers") or []
    eq([c.get("name") for c in containers], ["kube-flannel"], "containers")
    agent = by_name(containers, "kube-flannel") or {}
    eq(agent.get("image"), AGENT_IMAGE, "kube-flannel image")
    eq(agent.get("command"), ["/opt/bin/flanneld"], "kube-flannel command")
    eq(agent.get("args"), ["--ip-masq", "--kube-subnet-mgr", "--healthz-port=8081"],
       "kube-flannel args")
    eq(agent.get("ports"), [{"name": "healthz", "containerPort": 8081, "protocol": "TCP"}],
       "kube-flannel ports")
    for probe, path, delay, period in [("livenessProbe", "/healthz", 10, 30),
                                       ("readinessProbe", "/readyz", 5, 10)]:
        p = agent.get(probe) or {}
        http = p.get("httpGet") or {}
        eq(http.get("path"), path, f"{probe} path")
        check(http.get("port") in ("healthz", 8081),
              f"{probe} port: expected 8081 or 'healthz', found {http.get('port')!r}")
        check("host" not in http, f"{probe}: no host (the kubelet probes the node IP, as flannel)")
        eq(p.get("initialDelaySeconds"), delay, f"{probe} initialDelaySeconds")
        eq(p.get("periodSeconds"), period, f"{probe} periodSeconds")
    eq(get(agent, "resources", "requests"), {"cpu": "100m", "memory": "50Mi"},
       "kube-flannel resource requests")
    eq(get(agent, "resources", "limits"), None, "kube-flannel resource limits (none, as flannel)")

    sc = agent.get("securityContext") or {}
    eq(sc.get("privileged"), False, "kube-flannel securityContext.privileged")
    caps = get(sc, "capabilities", "add") or []
    eq(sorted(caps), sorted(["NET_ADMIN", "NET_RAW", "BPF", "PERFMON"]),
       "kube-flannel capabilities (exactly)")
    eq(len(caps), len(set(caps)), "kube-flannel capabilities without repeats")
    eq(get(sc, "capabilities", "drop"), None, "kube-flannel capabilities.drop")
    eq(sorted(sc), ["capabilities", "privileged"], "kube-flannel securityContext fields")

    env = agent.get("env") or []
    eq([e.get("name") for e in env],
       ["POD_NAME", "POD_NAMESPACE", "NODE_NAME", "EVENT_QUEUE_DEPTH", "CONT_WHEN_CACHE_NOT_READY"],
       "kube-flannel env names")
    for name, field in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                        ("NODE_NAME", "spec.nodeName")]:
        eq(get(by_name(env, name), "valueFrom"), {"fieldRef": {"fieldPath": field}},
           f"env {name}")
    eq(get(by_name(env, "EVENT_QUEUE_DEPTH"), "value"), "5000", "env EVENT_QUEUE_DEPTH")
    eq(get(by_name(env, "CONT_WHEN_CACHE_NOT_READY"), "value"), "false",
       "env CONT_WHEN_CACHE_NOT_READY")

    check_mount(agent, "run", "/run/flannel")
    check_mount(agent, "flannel-cfg", "/etc/kube-flannel/")
    check_mount(agent, "xtables-lock", "/run/xtables.lock")
    check_mount(agent, "bpffs", "/sys/fs/bpf", propagation="HostToContainer")
    eq(sorted(m.get("name") for m in agent.get("volumeMounts") or []),
       ["bpffs", "flannel-cfg", "run", "xtables-lock"], "kube-flannel mounts (exactly)")


def check_volumes(spec):
    volumes = spec.get("volumes") or []
    expected = {
        "run": {"hostPath": {"path": "/run/flannel"}},
        "cni-plugin": {"hostPath": {"path": "/opt/cni/bin"}},
        "cni": {"hostPath": {"path": "/etc/cni/net.d"}},
        "flannel-cfg": {"configMap": {"name": "kube-flannel-cfg"}},
        "xtables-lock": {"hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
        "bpffs": {"hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}},
    }
    eq(sorted(v.get("name") for v in volumes), sorted(expected), "volumes (exactly; no /lib/modules)")
    for name, source in expected.items():
        v = dict(by_name(volumes, name) or {})
        v.pop("name", None)
        eq(v, source, f"volume {name}")


def check_api_rules(spec):
    """What the API server rejects and the schemas let through."""
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    all_containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    names = [c.get("name") for c in all_containers]
    eq(len(names), len(set(names)), "container names unique")
    for c in all_containers:
        mounts = c.get("volumeMounts") or []
        paths = [m.get("mountPath") for m in mounts]
        eq(len(paths), len(set(paths)), f"container {c.get('name')}: mount paths unique")
        env = [e.get("name") for e in c.get("env") or []]
        eq(len(env), len(set(env)), f"container {c.get('name')}: env names unique")
        for m in mounts:
            check(m.get("name") in volumes,
                  f"container {c.get('name')}: mount {m.get('name')} names no volume")
            if m.get("mountPropagation") == "Bidirectional":
                check(get(c, "securityContext", "privileged") is True,
                      f"container {c.get('name')}: Bidirectional propagation needs privileged")


def check_daemonset(ds):
    eq(get(ds, "metadata", "namespace"), "kube-flannel", "DaemonSet namespace")
    eq(get(ds, "metadata", "labels"), {"tier": "node", "app": "flannel", "k8s-app": "flannel"},
       "DaemonSet labels")
    eq(get(ds, "spec", "selector"), {"matchLabels": {"app": "flannel"}},
       "DaemonSet selector (flannel's: an apply over flannel updates in place)")
    eq(get(ds, "spec", "template", "metadata", "labels"), {"tier": "node", "app": "flannel"},
       "pod template labels")
    spec = get(ds, "spec", "template", "spec") or {}
    eq(get(spec, "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution",
           "nodeSelectorTerms"),
       [{"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}],
       "node affinity")
    eq(spec.get("hostNetwork"), True, "hostNetwork")
    eq(spec.get("priorityClassName"), "system-node-critical", "priorityClassName")
    eq(spec.get("tolerations"), [{"operator": "Exists", "effect": "NoSchedule"}], "tolerations")
    eq(spec.get("serviceAccountName"), "flannel", "serviceAccountName")
    check_init_containers(spec)
    check_agent(spec)
    check_volumes(spec)
    check_api_rules(spec)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: check_manifest.py MANIFEST")
    path = sys.argv[1]
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        print(f"FAIL: reading {path}: {e}")
        return 1

    validate_schemas(docs)
    kinds = [(get(d, "kind"), get(d, "metadata", "name")) for d in docs]
    expected = [("Namespace", "kube-flannel"), ("ClusterRole", "flannel"),
                ("ClusterRoleBinding", "flannel"), ("ServiceAccount", "flannel"),
                ("ConfigMap", "kube-flannel-cfg"), ("DaemonSet", "kube-flannel-ds")]
    eq(kinds, expected, "documents (kind, name), in order")
    found = dict(zip(kinds, docs))
    doc = lambda kind, name: found.get((kind, name)) or {}
    check_namespace(doc("Namespace", "kube-flannel"))
    check_rbac(doc("ClusterRole", "flannel"), doc("ClusterRoleBinding", "flannel"),
               doc("ServiceAccount", "flannel"))
    check_configmap(doc("ConfigMap", "kube-flannel-cfg"))
    check_daemonset(doc("DaemonSet", "kube-flannel-ds"))

    for f in failures:
        print(f"FAIL: {f}")
    verdict = f"{len(failures)} of {checks} checks failed" if failures else f"all {checks} checks passed"
    print(f"{path}: {len(docs)} documents, schemas of Kubernetes {KUBERNETES_VERSION} "
          f"(kubernetes-validate {kubernetes_validate.version.__version__}, strict): {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
