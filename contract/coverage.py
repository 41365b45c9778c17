"""Every documented 4xx, observed: by Schemathesis (its VCR cassettes) or by a named test.

    python3 contract/coverage.py shared/openapi.json run1.yaml [run2.yaml ...]

For each operation of the OpenAPI document and each 4xx it documents, the pair must appear in
a cassette (a response with that status to a request for that operation), or be listed in
contract/named-tests.json with a test of runner/tests/api that exists. The 5xx are the fault
tests' (503 unavailable) and never expected here. Prints the figures; exits 1 on a gap, on a
5xx in a cassette, or on a named test that is not there.
"""

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = {"get", "put", "post", "patch", "delete", "head", "options"}


def operations(document):
    """(method, compiled path pattern, operationId, documented statuses) per operation."""
    found = []
    for path, item in document["paths"].items():
        pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
        for method, op in item.items():
            if method in METHODS:
                found.append((method.upper(), pattern, op["operationId"], set(op["responses"])))
    return found


def interactions(cassette):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(cassette, encoding="utf-8") as f:
        data = yaml.load(f, Loader=loader)
    for item in data.get("http_interactions") or []:
        response = item.get("response")
        if response is not None:
            yield item["request"], int(response["status"]["code"])


def main(document_path, cassettes):
    document = json.loads(pathlib.Path(document_path).read_text())
    ops = operations(document)
    observed, cases, server_errors = set(), 0, []
    for cassette in cassettes:
        for request, status in interactions(cassette):
            cases += 1
            path = re.sub(r"^[a-z]+://[^/]+", "", request["uri"]).split("?")[0]
            method = "GET" if request["method"] == "HEAD" else request["method"]
            for op_method, pattern, op_id, _ in ops:
                if op_method == method and pattern.match(path):
                    observed.add((op_id, str(status)))
            if status >= 500:
                server_errors.append(f"{request['method']} {request['uri']} -> {status}")

    named = json.loads((ROOT / "contract" / "named-tests.json").read_text())
    sources = {p.stem: p.read_text() for p in (ROOT / "runner" / "tests" / "api").glob("*.rs")}
    gaps, by_test, unknown_tests = [], [], []
    documented = sorted(
        (op_id, status) for _, _, op_id, statuses in ops for status in statuses if status.startswith("4")
    )
    for op_id, status in documented:
        if (op_id, status) in observed:
            continue
        test = named.get(f"{op_id} {status}")
        if test is None:
            gaps.append(f"{op_id} {status}")
            continue
        module, _, name = test.partition("::")
        if not re.search(rf"\bfn {re.escape(name)}\s*\(", sources.get(module, "")):
            unknown_tests.append(f"{op_id} {status}: {test}")
        by_test.append(f"{op_id} {status}: {test}")

    print(f"operations: {len(ops)}; test cases in the cassettes: {cases}")
    print(f"documented 4xx (operation, status): {len(documented)}; observed by Schemathesis: "
          f"{len(documented) - len(by_test) - len(gaps)}; by a named test: {len(by_test)}")
    for line in by_test:
        print(f"  named test  {line}")
    ok = True
    for problem, lines in [
        ("a 5xx in the cassettes", server_errors),
        ("documented, never observed, and no named test", gaps),
        ("named in contract/named-tests.json but not found in runner/tests/api", unknown_tests),
    ]:
        if lines:
            ok = False
            print(f"FAIL {problem}:")
            for line in lines[:50]:
                print(f"  {line}")
    print("ok   every documented 4xx is observed" if ok else "FAIL the contract run")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
