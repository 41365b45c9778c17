#!/usr/bin/env python3
"""Validates the deployment offline, as CI does: renders each kustomize overlay, checks every
core object with kubernetes-validate (strict: unknown fields fail), every Knative Service and
PingSource against the Knative CRD schemas in knative/schemas, the Secret templates, and the
connection budget. Then proves the checks bite: misspelled fields and an over-budget max-scale
must be rejected.

    python3 knative/validate.py            # exit 0 when everything holds
"""

import copy
import json
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
OVERLAYS = ["minikube", "cnpg", "doks"]
# Applied by hand, outside any kustomization, and validated all the same.
EXTRA_MANIFESTS = ["overlays/cnpg/recovery.yaml"]
K8S_VERSION = "1.32.0"  # DOKS and minikube at the time of writing
SCHEMAS = {
    ("serving.knative.dev/v1", "Service"): "service-serving-v1.json",
    ("sources.knative.dev/v1", "PingSource"): "pingsource-sources-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-gateway-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway-v1.json",
    ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"): "referencegrant-gateway-v1beta1.json",
    ("eventing.knative.dev/v1", "Broker"): "broker-eventing-v1.json",
    ("eventing.knative.dev/v1", "Trigger"): "trigger-eventing-v1.json",
    ("sources.knative.dev/v1", "SinkBinding"): "sinkbinding-sources-v1.json",
    ("cert-manager.io/v1", "Certificate"): "certificate-cert-manager-v1.json",
    ("cert-manager.io/v1", "ClusterIssuer"): "clusterissuer-cert-manager-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): "cluster-postgresql-v1.json",
    ("postgresql.cnpg.io/v1", "Pooler"): "pooler-postgresql-v1.json",
    ("postgresql.cnpg.io/v1", "ScheduledBackup"): "scheduledbackup-postgresql-v1.json",
    ("barmancloud.cnpg.io/v1", "ObjectStore"): "objectstore-barmancloud-v1.json",
}
# Postgres keeps this many for superusers (superuser_reserved_connections, default 3).
SUPERUSER_RESERVE_DEFAULT = 3
MAX_POOL = 4
# A rollout runs the old and the new revision side by side, each up to its max-scale.
ROLLOUT_REVISIONS = 2


def render(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(HERE / "overlays" / overlay)],
        check=True, capture_output=True, text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def close_objects(schema):
    """additionalProperties: false on every object schema under `schema` that lists properties
    and leaves the rest open (as the API server's strict field validation would)."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            close_objects(value)
    elif isinstance(schema, list):
        for value in schema:
            close_objects(value)
    return schema


def schema_for(doc):
    name = SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if not name:
        return None
    schema = json.loads((HERE / "schemas" / name).read_text())
    if doc.get("kind") == "Trigger":
        # Upstream leaves a Trigger's spec and spec.delivery open, so a misspelled retry,
        # backoffPolicy or deadLetterSink would pass: closed here.
        close_objects(schema["properties"]["spec"])
    return schema


def problems_of(doc):
    """Validation errors of one object, as strings (empty when it is valid)."""
    what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    schema = schema_for(doc)
    if schema is not None:
        validator = jsonschema.Draft7Validator(schema)
        return [f"{what}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{what}: {'/'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{what}: no schema: {e}"]
    return []


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def via_pooler(docs, pod_spec):
    """Whether a pod's connections go through a Pooler: there is one, and the pod is not one of
    the owner's direct clients (migrate, backup: session state) but uses tally-db-app or
    tally-db-readonly, whose URLs name the pooler."""
    return bool(find(docs, "Pooler")) and "tally-db" not in secrets_of(pod_spec)


def database_limits(docs):
    """(max_connections, superuser reserve, admin reserve) of the StatefulSet or the Cluster."""
    clusters = find(docs, "Cluster")
    if clusters:
        (cluster,) = clusters
        settings = cluster["spec"].get("postgresql", {}).get("parameters", {})
        annotations = cluster["metadata"]["annotations"]
    else:
        (pg,) = find(docs, "StatefulSet", "postgres")
        args = pg["spec"]["template"]["spec"]["containers"][0].get("args", [])
        settings = dict(a.split("=", 1) for a in args if "=" in a)
        annotations = pg["metadata"]["annotations"]
    return (int(settings.get("max_connections", 100)),
            int(settings.get("superuser_reserved_connections", SUPERUSER_RESERVE_DEFAULT)),
            int(annotations["tally.dev/admin-reserve-connections"]))


def connection_budget(docs):
    """(used, available, lines): the worst case of connections against what Postgres allows.

    used = sum over Knative Services that connect directly of 2 x max-scale x POOL_SIZE (during
           a rollout the old and the new revision can each reach max-scale)
         + for a Pooler (CloudNativePG), its pods at most x max_db_connections, instead of the
           pools of the functions behind it
         + sum of the jobs' tally.dev/db-connections (the processor is a Knative Service)
         + the admin reserve annotated on the StatefulSet or Cluster
    available = max_connections - superuser_reserved_connections
    """
    lines, used = [], 0
    for svc in find(docs, "Service"):
        if svc["apiVersion"] != "serving.knative.dev/v1":
            continue
        template = svc["spec"]["template"]
        max_scale = int(template["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"])
        concurrency = int(template["spec"]["containerConcurrency"])
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        pool = int(env["POOL_SIZE"])
        expected = min(MAX_POOL, concurrency)
        if pool != expected:
            raise SystemExit(f"{svc['metadata']['name']}: POOL_SIZE {pool}, but min({MAX_POOL}, containerConcurrency {concurrency}) = {expected}")
        if via_pooler(docs, template["spec"]):
            lines.append(f"  {svc['metadata']['name']:<16} through the pooler")
            continue
        # Connections a pod opens besides its pool (the backup's pg_dump).
        extra = int(template["metadata"]["annotations"].get("tally.dev/extra-db-connections", "0"))
        used += ROLLOUT_REVISIONS * max_scale * (pool + extra)
        lines.append(f"  {svc['metadata']['name']:<16} {ROLLOUT_REVISIONS} revisions x max-scale {max_scale:>3} x (pool {pool} + {extra}) = {ROLLOUT_REVISIONS * max_scale * (pool + extra)}")
    for pooler in find(docs, "Pooler"):
        pods = int(pooler["metadata"]["annotations"]["tally.dev/max-pods"])
        if pods < pooler["spec"]["instances"]:
            raise SystemExit(f"Pooler/{pooler['metadata']['name']}: tally.dev/max-pods {pods} < instances")
        per_pod = int(pooler["spec"]["pgbouncer"].get("parameters", {})["max_db_connections"])
        used += pods * per_pod
        lines.append(f"  Pooler/{pooler['metadata']['name']:<20} {pods} pods x max_db_connections {per_pod} = {pods * per_pod}")
    for kind in ("Job", "CronJob"):
        for job in find(docs, kind):
            n = int(job["metadata"].get("annotations", {}).get("tally.dev/db-connections", "1"))
            used += n
            lines.append(f"  {kind + '/' + job['metadata']['name']:<27} {n}")
    max_connections, superuser, reserve = database_limits(docs)
    used += reserve
    lines.append(f"  admin reserve              {reserve}")
    available = max_connections - superuser
    return used, available, lines


def cnpg_problems(docs):
    """What the CloudNativePG overlay promises (README, "Scaling the database"): three
    instances with data checksums, WAL archived by the Barman Cloud plugin to an ObjectStore
    that exists, a ScheduledBackup of that cluster, a transaction-mode Pooler in front of it,
    and migrate without --roles (the Cluster makes the roles)."""
    clusters = find(docs, "Cluster")
    if not clusters:
        return []
    problems = []
    (cluster,) = clusters
    spec, name = cluster["spec"], cluster["metadata"]["name"]
    if spec.get("instances", 1) < 3:
        problems.append(f"Cluster/{name}: fewer than 3 instances")
    if not spec.get("bootstrap", {}).get("initdb", {}).get("dataChecksums"):
        problems.append(f"Cluster/{name}: data checksums are off")
    stores = {d["metadata"]["name"] for d in find(docs, "ObjectStore")}
    archivers = [p for p in spec.get("plugins", []) if p.get("isWALArchiver")]
    if not archivers or archivers[0].get("parameters", {}).get("barmanObjectName") not in stores:
        problems.append(f"Cluster/{name}: no WAL archiver writing to an ObjectStore in the overlay")
    if not any(b["spec"]["cluster"]["name"] == name for b in find(docs, "ScheduledBackup")):
        problems.append(f"Cluster/{name}: no ScheduledBackup")
    poolers = [p for p in find(docs, "Pooler") if p["spec"]["cluster"]["name"] == name]
    if not poolers or any(p["spec"]["pgbouncer"].get("poolMode") != "transaction" for p in poolers):
        problems.append(f"Cluster/{name}: the functions' Pooler must run in transaction mode")
    for job in find(docs, "Job", "migrate"):
        if "--roles" in job["spec"]["template"]["spec"]["containers"][0].get("args", []):
            problems.append("Job/migrate: --roles on CloudNativePG (the Cluster makes the roles)")
    return problems


# Least privilege: which database Secret (role) and whether the signing key each workload may
# see. The owner's Secret only where the schema is changed or dumped; the public key only where
# a route authenticates (list-products serves the public catalog only).
ACCESS = {
    "Service/list-products": ("tally-db-readonly", False),
    "Service/get-order": ("tally-db-readonly", True),
    "Service/list-orders": ("tally-db-readonly", True),
    "Service/create-order": ("tally-db-app", True),
    "Service/cancel-order": ("tally-db-app", True),
    "Service/admin-products": ("tally-db-app", True),
    "Service/process-orders": ("tally-db-app", True),
    "Service/backup": ("tally-db", True),
    "Job/migrate": ("tally-db", False),
    "CronJob/backup": ("tally-db", False),
    "CronJob/restore-drill": ("tally-db", False),
}


def secrets_of(pod_spec):
    names = set()
    for c in pod_spec.get("containers", []):
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                names.add(e["secretRef"]["name"])
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


def pod_specs(docs):
    for d in docs:
        if d["kind"] == "Service" and d["apiVersion"].startswith("serving.knative.dev"):
            yield "Service/" + d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Job":
            yield "Job/" + d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield "CronJob/" + d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


# The queue-proxy sidecar shares each Knative pod's network and listens on these.
QUEUE_PROXY_PORTS = {8008, 8012, 8013, 8022, 9090, 9091}


def port_problems(docs):
    problems = []
    for d in docs:
        if d["kind"] == "ConfigMap" and "METRICS_PORT" in d.get("data", {}):
            if int(d["data"]["METRICS_PORT"]) in QUEUE_PROXY_PORTS:
                problems.append(f"METRICS_PORT {d['data']['METRICS_PORT']} is a Knative queue-proxy port")
        if d["kind"] == "Service" and d["apiVersion"].startswith("serving.knative.dev"):
            port = d["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/port")
            if port and int(port) in QUEUE_PROXY_PORTS:
                problems.append(f"Service/{d['metadata']['name']}: prometheus.io/port {port} is a Knative queue-proxy port")
    return problems


def privilege_problems(docs):
    problems = []
    for name, spec in pod_specs(docs):
        if name not in ACCESS:
            problems.append(f"least privilege: {name} is not in validate.py's ACCESS table")
            continue
        db_secret, needs_key = ACCESS[name]
        seen = secrets_of(spec)
        for other in {"tally-db", "tally-db-app", "tally-db-readonly"} - {db_secret}:
            if other in seen:
                problems.append(f"least privilege: {name} mounts {other}; it should use {db_secret} only")
        if ("tally-jwt" in seen) != needs_key:
            problems.append(f"least privilege: {name} {'lacks' if needs_key else 'mounts'} the signing key Secret tally-jwt")
    return problems


def rollout_problems(docs):
    """Every Knative Service declares its traffic (latest revision, 100%), so each apply resets a
    rollback's pin; and the kubelet's probes ask the process (/livez), not the database."""
    problems = []
    for svc in find(docs, "Service"):
        if svc["apiVersion"] != "serving.knative.dev/v1":
            continue
        name = svc["metadata"]["name"]
        if svc["spec"].get("traffic") != [{"latestRevision": True, "percent": 100}]:
            problems.append(f"Service/{name}: spec.traffic must be [latestRevision: true, percent: 100]")
        container = svc["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            path = container.get(probe, {}).get("httpGet", {}).get("path")
            if path != "/livez":
                problems.append(f"Service/{name}: {probe} must GET /livez (the process), not {path!r}")
    return problems


def check(docs, label, schema_checked=None):
    """Every check; the schema validation (the slow part) only for `schema_checked` when
    given: a mutation re-validates the one document it changed."""
    errors = ([p for d in (docs if schema_checked is None else schema_checked) for p in problems_of(d)]
              + privilege_problems(docs) + port_problems(docs) + rollout_problems(docs)
              + cnpg_problems(docs))
    if errors:
        return errors, 0, 0, []
    used, available, lines = connection_budget(docs)
    if used > available:
        errors.append(
            f"connection budget: {used} connections at full scale > max_connections - superuser reserve = {available}:\n"
            + "\n".join(lines)
            + "\n  lower max-scale or POOL_SIZE, raise max_connections, or put PgBouncer in front (README)"
        )
    return errors, used, available, lines


def mutations(docs):
    """Each returns a broken copy of the rendered objects that the checks must reject."""
    def knative_container_typo(ds):
        svc = find(ds, "Service", "create-order")[0]
        c = svc["spec"]["template"]["spec"]["containers"][0]
        c["envv"] = c.pop("env")
        return ds

    def knative_probe_typo(ds):
        svc = find(ds, "Service", "list-products")[0]
        probe = svc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        probe["httpget"] = probe.pop("httpGet")
        return ds

    def statefulset_container_typo(ds):
        pg = find(ds, "StatefulSet", "postgres")[0]
        c = pg["spec"]["template"]["spec"]["containers"][0]
        c["imagePullPolicyy"] = "Always"
        return ds

    def cronjob_typo(ds):
        cj = find(ds, "CronJob", "backup")[0]
        cj["spec"]["concurrencyPolicyy"] = cj["spec"].pop("concurrencyPolicy")
        return ds

    def pingsource_typo(ds):
        ps = find(ds, "PingSource")[0]
        ps["spec"]["schedul"] = ps["spec"].pop("schedule")
        return ds

    def key_in_public_function(ds):
        svc = find(ds, "Service", "list-products")[0]
        svc["spec"]["template"]["spec"]["containers"][0].setdefault("envFrom", []).append(
            {"secretRef": {"name": "tally-jwt"}})
        return ds

    def owner_role_in_a_function(ds):
        svc = find(ds, "Service", "create-order")[0]
        svc["spec"]["template"]["spec"]["containers"][0].setdefault("envFrom", []).append(
            {"secretRef": {"name": "tally-db"}})
        return ds

    def metrics_on_a_queue_proxy_port(ds):
        find(ds, "ConfigMap", "tally-config")[0]["data"]["METRICS_PORT"] = "9090"
        return ds

    def over_budget(ds):
        svc = find(ds, "Service", "create-order")[0]
        svc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] = "100"
        return ds

    def traffic_pinned(ds):
        find(ds, "Service", "get-order")[0]["spec"]["traffic"] = [
            {"revisionName": "get-order-00001", "percent": 100}]
        return ds

    def probe_on_the_database(ds):
        c = find(ds, "Service", "cancel-order")[0]["spec"]["template"]["spec"]["containers"][0]
        c["readinessProbe"]["httpGet"]["path"] = "/healthz"
        return ds

    def pdb_typo(ds):
        pdb = find(ds, "PodDisruptionBudget", "postgres")[0]
        pdb["spec"]["maxUnavailabl"] = pdb["spec"].pop("maxUnavailable")
        return ds

    def trigger_delivery_typo(ds):
        delivery = find(ds, "Trigger", "order-placed")[0]["spec"]["delivery"]
        delivery["retries"] = delivery.pop("retry")
        return ds

    def trigger_backoff_typo(ds):
        delivery = find(ds, "Trigger", "order-placed")[0]["spec"]["delivery"]
        delivery["backOffPolicy"] = delivery.pop("backoffPolicy")
        return ds

    def trigger_dead_letter_typo(ds):
        delivery = find(ds, "Trigger", "order-placed")[0]["spec"]["delivery"]
        delivery["deadLetterSinks"] = delivery.pop("deadLetterSink")
        return ds

    def trigger_spec_typo(ds):
        spec = find(ds, "Trigger", "order-placed")[0]["spec"]
        spec["filters_"] = spec.pop("filter")
        return ds

    def sinkbinding_typo(ds):
        find(ds, "SinkBinding")[0]["spec"]["subject"]["selectr"] = {}
        return ds

    def broker_typo(ds):
        find(ds, "Broker")[0]["spec"] = {"confg": {}}
        return ds

    def prometheusrule_typo(ds):
        rule = find(ds, "PrometheusRule", "tally-alerts")[0]["spec"]["groups"][0]["rules"][0]
        rule["fore"] = rule.pop("for")
        return ds

    def podmonitor_typo(ds):
        endpoint = find(ds, "PodMonitor", "tally-functions")[0]["spec"]["podMetricsEndpoints"][0]
        endpoint["portNumbr"] = endpoint.pop("portNumber")
        return ds

    def httproute_typo(ds):
        route = find(ds, "HTTPRoute", "tally-api-create-order")
        if route:
            route[0]["spec"]["rules"][0]["matches"][0]["methd"] = "POST"
        return ds

    def certificate_typo(ds):
        cert = find(ds, "Certificate", "tally-api")
        if cert:
            cert[0]["spec"]["dnsName"] = cert[0]["spec"].pop("dnsNames")
        return ds

    def gateway_listener_typo(ds):
        gw = find(ds, "Gateway", "tally-api")
        if gw:
            gw[0]["spec"]["listeners"][0]["tls"]["certificateRef"] = gw[0]["spec"]["listeners"][0]["tls"].pop("certificateRefs")
        return ds

    def referencegrant_typo(ds):
        grant = find(ds, "ReferenceGrant")
        if grant:
            grant[0]["spec"]["to"][0]["nam"] = grant[0]["spec"]["to"][0].pop("name")
        return ds

    return [f for f in (knative_container_typo, knative_probe_typo, statefulset_container_typo,
                        cronjob_typo, pingsource_typo, key_in_public_function,
                        owner_role_in_a_function, metrics_on_a_queue_proxy_port, over_budget,
                        traffic_pinned, probe_on_the_database, pdb_typo, httproute_typo,
                        certificate_typo, gateway_listener_typo, referencegrant_typo,
                        trigger_delivery_typo, trigger_backoff_typo, trigger_dead_letter_typo,
                        trigger_spec_typo, sinkbinding_typo, broker_typo, prometheusrule_typo,
                        podmonitor_typo)]


def cnpg_mutations(docs):
    """The CloudNativePG overlay's broken copies: misspelled fields in each of its kinds, and
    what cnpg_problems and the budget must catch."""
    def edit(kind, change):
        def mutate(ds):
            change(find(ds, kind)[0])
            return ds
        return mutate

    def rename(obj, path, new):
        *parents, last = path
        for key in parents:
            obj = obj[key]
        obj[new] = obj.pop(last)

    cases = {
        "cluster_instances_typo": edit("Cluster", lambda c: rename(c, ["spec", "instances"], "instance")),
        "cluster_checksums_typo": edit("Cluster", lambda c: rename(
            c, ["spec", "bootstrap", "initdb", "dataChecksums"], "dataChecksum")),
        "cluster_archiver_typo": edit("Cluster", lambda c: rename(
            c["spec"]["plugins"][0], ["isWALArchiver"], "isWalArchiver")),
        "cluster_role_typo": edit("Cluster", lambda c: rename(
            c["spec"]["managed"]["roles"][0], ["passwordSecret"], "passwordSecrets")),
        "cluster_monitoring_typo": edit("Cluster", lambda c: rename(
            c, ["spec", "monitoring", "enablePodMonitor"], "enablePodMonitors")),
        "pooler_mode_typo": edit("Pooler", lambda p: rename(p, ["spec", "pgbouncer", "poolMode"], "poolmode")),
        "scheduledbackup_typo": edit("ScheduledBackup", lambda b: rename(b, ["spec", "schedule"], "scheduel")),
        "objectstore_typo": edit("ObjectStore", lambda o: rename(
            o, ["spec", "configuration", "s3Credentials", "accessKeyId"], "accessKeyID")),
        "no_checksums": edit("Cluster", lambda c: c["spec"]["bootstrap"]["initdb"].update(dataChecksums=False)),
        "one_instance": edit("Cluster", lambda c: c["spec"].update(instances=1)),
        "archiver_to_a_missing_store": edit("Cluster", lambda c: c["spec"]["plugins"][0]["parameters"].update(
            barmanObjectName="nowhere")),
        "pooler_in_session_mode": edit("Pooler", lambda p: p["spec"]["pgbouncer"].update(poolMode="session")),
        "pooler_over_budget": edit("Pooler", lambda p: p["spec"]["pgbouncer"]["parameters"].update(
            max_db_connections="1000")),
        "migrate_makes_roles": edit("Job", lambda j: j["spec"]["template"]["spec"]["containers"][0].update(
            args=["--roles"])),
    }
    for name, mutate in cases.items():
        mutate.__name__ = name
    return list(cases.values())


def extra_manifests_valid():
    """The manifests applied by hand (the recovery Cluster), strictly, and one misspelling each
    must fail."""
    ok = True
    for path in EXTRA_MANIFESTS:
        docs = [d for d in yaml.safe_load_all((HERE / path).read_text()) if d]
        errors = [p for d in docs for p in problems_of(d)]
        if errors:
            ok = False
            print(f"FAIL {path}:", *errors[:10], sep="\n  ")
            continue
        if not any(d["kind"] == "NetworkPolicy" for d in docs):
            ok = False
            print(f"FAIL {path}: no NetworkPolicy fences the restored cluster")
            continue
        broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Cluster"))
        recovery = broken["spec"]["bootstrap"]["recovery"]
        recovery["recoveryTarget"]["targetTme"] = recovery["recoveryTarget"].pop("targetTime")
        if problems_of(broken):
            print(f"ok   {path}: {len(docs)} objects valid; a misspelled targetTime is rejected")
        else:
            ok = False
            print(f"FAIL {path}: a misspelled targetTime was accepted")
    return ok


def alerts_match(docs):
    """The PrometheusRule deploys exactly knative/alerts/rules.yml, the file promtool checks."""
    rules = yaml.safe_load((HERE / "alerts" / "rules.yml").read_text())
    (deployed,) = find(docs, "PrometheusRule", "tally-alerts")
    if deployed["spec"] != rules:
        print("FAIL PrometheusRule tally-alerts differs from knative/alerts/rules.yml")
        return False
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    print(f"ok   PrometheusRule tally-alerts: {len(names)} alerts, as knative/alerts/rules.yml")
    return True


def rollout_steps_hold(docs):
    """knative/rollout.py's candidate and rollback manifests, from the rendered overlay and a
    previous revision per function (one function new): each validates strictly, and its traffic
    is what the step means."""
    import tempfile
    services = [d["metadata"]["name"] for d in find(docs, "Service") if d["apiVersion"] == "serving.knative.dev/v1"]
    revisions = {name: f"{name}-00007" for name in services[1:]}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        rendered, previous = pathlib.Path(tmp, "rendered.yaml"), pathlib.Path(tmp, "previous.txt")
        rendered.write_text(yaml.safe_dump_all(docs))
        previous.write_text("".join(f"{n} {revisions.get(n, '')}\n" for n in services))
        for step in ("candidate", "rollback"):
            out = subprocess.run([sys.executable, str(HERE / "rollout.py"), step, str(rendered), str(previous)],
                                 check=True, capture_output=True, text=True).stdout
            stepped = [d for d in yaml.safe_load_all(out) if d]
            errors = [p for d in stepped for p in problems_of(d)]
            for svc in find(stepped, "Service"):
                if svc["apiVersion"] != "serving.knative.dev/v1":
                    continue
                name, traffic = svc["metadata"]["name"], svc["spec"]["traffic"]
                old = revisions.get(name)
                want = ([{"latestRevision": True, "percent": 100}] if not old
                        else [{"revisionName": old, "percent": 100}] + (
                            [{"latestRevision": True, "tag": "candidate", "percent": 0}] if step == "candidate" else []))
                if traffic != want:
                    errors.append(f"Service/{name}: {step} traffic {traffic}, expected {want}")
            if errors or len(stepped) != len(docs):
                ok = False
                print(f"FAIL rollout.py {step}:", *errors[:10], sep="\n  ")
            else:
                print(f"ok   rollout.py {step}: {len(stepped)} objects valid, traffic as the step means")
    return ok


def main():
    failed = False
    for overlay in OVERLAYS:
        docs = render(overlay)
        errors, used, available, lines = check(docs, overlay)
        kinds = sorted({d["kind"] for d in docs})
        if errors:
            failed = True
            print(f"FAIL {overlay}:")
            for e in errors:
                print("  " + e)
        else:
            print(f"ok   {overlay}: {len(docs)} objects ({', '.join(kinds)}); connection budget {used}/{available}")
        # The mutations run on doks, which has every kind (its gateway and certificates too),
        # and the CloudNativePG kinds' on cnpg.
        if overlay in ("doks", "cnpg"):
            print("\n".join(lines))
            for mutate in (mutations if overlay == "doks" else cnpg_mutations)(docs):
                broken = mutate(copy.deepcopy(docs))
                changed = [b for b, d in zip(broken, docs) if b != d]
                broken_errors, *_ = check(broken, overlay, schema_checked=changed)
                if broken_errors:
                    print(f"ok   rejected as it should be: {mutate.__name__}: {broken_errors[0].splitlines()[0]}")
                else:
                    failed = True
                    print(f"FAIL the checks accepted a broken manifest: {mutate.__name__}")
    failed |= not extra_manifests_valid()
    failed |= not rollout_steps_hold(render(OVERLAYS[-1]))
    failed |= not alerts_match(render(OVERLAYS[-1]))
    secrets = [d for d in yaml.safe_load_all((HERE / "secrets.template.yaml").read_text()) if d]
    secret_errors = [p for d in secrets for p in problems_of(d)]
    if secret_errors or any(v != "REPLACE_ME" and "REPLACE_ME" not in v and k.upper().endswith(("PASSWORD", "SECRET", "SECRET_KEY", "KEY_ID"))
                            for d in secrets for k, v in d.get("stringData", {}).items()):
        failed = True
        print("FAIL secrets.template.yaml:", secret_errors or "holds a value that is not a placeholder")
    else:
        print(f"ok   secrets.template.yaml: {len(secrets)} Secret templates, placeholders only")
    jwt = next(d for d in secrets if d["metadata"]["name"] == "tally-jwt").get("stringData", {})
    if "JWT_PUBLIC_KEY_PEM" not in jwt or {"JWT_HS256_SECRET", "JWT_PRIVATE_KEY_PEM"} & set(jwt):
        failed = True
        print("FAIL secrets.template.yaml: tally-jwt must carry a public key only (no HS256 secret, no private key)")
    else:
        print("ok   tally-jwt: a public key only")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
