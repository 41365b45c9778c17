#!/usr/bin/env python3
"""Rewrites the rendered manifests' Knative traffic for one step of a rollout (deploy.yml).

    python3 knative/rollout.py candidate rendered.yaml previous-revisions.txt > candidate.yaml
    python3 knative/rollout.py rollback  rendered.yaml previous-revisions.txt > rollback.yaml

previous-revisions.txt has one "<service> <revision>" line per function, the revision that
served before this deploy (empty for a function deployed for the first time).

- candidate: the previous revision keeps 100%; the new one (latest) gets the tag `candidate`
  at 0%, with its own URL to smoke-test. A function with no previous revision takes 100% now.
- rollback: the previous revision gets 100% back.

Both are applied with `kubectl apply`, like the promotion (the manifests as written: the latest
revision at 100%). So each step's traffic is what the last apply declared, and the next deploy's
apply replaces a rollback's pin instead of keeping it: kubectl's three-way merge keeps a pin
only when it was patched in behind apply's back.
"""

import sys

import yaml


def previous(path):
    revisions = {}
    for line in open(path, encoding="utf-8"):
        parts = line.split()
        if len(parts) == 2:
            revisions[parts[0]] = parts[1]
    return revisions


def traffic(step, old):
    if step == "candidate":
        return [
            {"revisionName": old, "percent": 100},
            {"latestRevision": True, "tag": "candidate", "percent": 0},
        ]
    return [{"revisionName": old, "percent": 100}]


def main(step, rendered, revisions_file):
    if step not in ("candidate", "rollback"):
        raise SystemExit(f"unknown step {step!r}: candidate or rollback")
    revisions = previous(revisions_file)
    docs = [d for d in yaml.safe_load_all(open(rendered, encoding="utf-8")) if d]
    for doc in docs:
        if doc.get("apiVersion") == "serving.knative.dev/v1" and doc.get("kind") == "Service":
            old = revisions.get(doc["metadata"]["name"])
            if old:
                doc["spec"]["traffic"] = traffic(step, old)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
