"""JUnit XML for `gpuscope check --junit`: one test case per limit, forbidden code and finding.

The layout is the one CI systems render (Jenkins, GitLab, GitHub Actions
reporters, Azure Pipelines): a `<testsuites>` root holding one
`<testsuite name="gpuscope.check">` with tests/failures/errors/skipped counts.

  pass        an empty `<testcase>` (green)
  fail        `<testcase>` with `<failure message="..." type="limit">` carrying the measured value
  unmeasured  `<testcase>` with `<error message="not measured: ..." type="unmeasured">`: CI
              systems show errors as not passing, whereas `<skipped>` often reads as neutral,
              and a limit nobody measured must not look green.

Text from the outside world (finding titles can hold process names) is stripped
of characters XML 1.0 cannot carry; the file is written atomically.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from gpuscope.record.files import write_bytes_atomic

SUITE_NAME = "gpuscope.check"
CLASSNAME = "gpuscope.check"

# Characters XML 1.0 allows: tab, LF, CR, and U+0020 up, minus surrogates and U+FFFE/U+FFFF.
_INVALID_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(value: Any) -> str:
    return _INVALID_XML.sub("\ufffd", "" if value is None else str(value))


def _as_dict(outcome: Any) -> dict[str, Any]:
    """A CheckOutcome, or its to_json() dict (as stored in run.json's "check")."""
    if hasattr(outcome, "to_json"):
        return outcome.to_json()
    if isinstance(outcome, dict):
        return outcome
    raise TypeError(f"expected a CheckOutcome or its JSON, got {type(outcome).__name__}")


def build_junit(outcome: Any) -> ET.Element:
    """The `<testsuites>` element for an outcome."""
    data = _as_dict(outcome)
    results = list(data.get("results", []))
    failures = sum(1 for r in results if r.get("status") == "fail")
    errors = sum(1 for r in results if r.get("status") == "unmeasured")
    counts = {"tests": str(len(results)), "failures": str(failures), "errors": str(errors), "skipped": "0"}

    root = ET.Element("testsuites", {"name": "gpuscope", **counts, "time": "0"})
    suite_attrs = {"name": SUITE_NAME, **counts, "time": "0"}
    run = data.get("run") or {}
    if data.get("checked_at"):
        # JUnit's timestamp is ISO-8601 without a zone suffix in the strict schema; most readers accept either.
        suite_attrs["timestamp"] = _clean(str(data["checked_at"]).replace("+00:00", ""))
    if run.get("hostname"):
        suite_attrs["hostname"] = _clean(run["hostname"])
    suite = ET.SubElement(root, "testsuite", suite_attrs)

    props = ET.SubElement(suite, "properties")
    for key, value in (("status", data.get("status")), ("exit_code", data.get("exit_code")),
                       ("at_predictors", data.get("at_predictors")),
                       ("at_predictors_source", data.get("at_predictors_source")),
                       ("run.started_at", run.get("started_at")), ("run.device", run.get("device")),
                       ("run.tool_version", run.get("tool_version"))):
        if value not in (None, ""):
            ET.SubElement(props, "property", {"name": key, "value": _clean(value)})

    for result in results:
        case = ET.SubElement(suite, "testcase", {"classname": CLASSNAME, "name": _clean(result.get("name")),
                                                 "time": "0"})
        message = _clean(result.get("message"))
        status = result.get("status")
        if status == "fail":
            node = ET.SubElement(case, "failure", {"message": message, "type": _clean(result.get("kind", "limit"))})
            node.text = _details(result)
        elif status == "unmeasured":
            node = ET.SubElement(case, "error", {"message": message, "type": "unmeasured"})
            node.text = _details(result)
        out = ET.SubElement(case, "system-out")
        out.text = f"{str(status).upper()}: {message}"
    return root


def _details(result: dict[str, Any]) -> str:
    lines = [_clean(result.get("message"))]
    for key in ("measured", "limit", "at_predictors"):
        value = result.get(key)
        if value not in (None, ""):
            lines.append(f"{key}: {_clean(value)}")
    if result.get("measured_raw") is not None:
        lines.append(f"measured_raw: {_clean(result.get('measured_raw'))} {_clean(result.get('unit', ''))}".rstrip())
    return "\n".join(lines)


def write_junit(outcome: Any, path: str) -> None:
    """Write the outcome as JUnit XML to `path` (parents created), atomically."""
    root = build_junit(outcome)
    ET.indent(root)
    payload = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    write_bytes_atomic(path, payload + b"\n", make_dirs=True)
