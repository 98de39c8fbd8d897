"""Write telegram_sandbox/bot_api_spec.json: the part of the Bot API spec the sandbox serves.

Reads the full machine-readable spec (../shared/bot-api/api.json beside the repository by
default), keeps the methods the telegram_sandbox package serves and every type reachable
from their parameters and results (other methods by name only), drops the prose, and records the constant of each discriminator
field ("Scope type, must be default" -> "const": "default") so union types can be told apart.

    python tools/extract_bot_api_spec.py [--spec PATH] [--out PATH]

Imports only the standard library and telegram_sandbox.constants (the list of served methods).
"""

import argparse
import json
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from telegram_sandbox.constants import SERVED_METHODS  # noqa: E402 (needs the repository on sys.path)

DEFAULT_SPEC = REPO.parent / "shared" / "bot-api" / "api.json"
DEFAULT_OUT = REPO / "telegram_sandbox" / "bot_api_spec.json"
CONST_RE = re.compile(r"(?:must be|always) [\"“*]?([a-z_]+)[\"”*]?")


def base_type(name: str) -> str:
    """'Array of Array of X' -> 'X'."""
    while name.startswith("Array of "):
        name = name[len("Array of "):]
    return name


def compact_field(field: dict, in_union: bool) -> dict:
    out = {"name": field["name"], "types": field["types"], "required": field["required"]}
    if in_union and field["required"] and field["types"] == ["String"]:
        match = CONST_RE.search(field.get("description", ""))
        if match:
            out["const"] = match.group(1)
    return out


def reachable_types(spec: dict, methods: list[str]) -> set[str]:
    stack = []
    for name in methods:
        method = spec["methods"][name]
        stack += [base_type(t) for t in method["returns"]]
        stack += [base_type(t) for f in method.get("fields", []) for t in f["types"]]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name not in spec["types"]:
            continue
        seen.add(name)
        entry = spec["types"][name]
        stack += entry.get("subtypes", [])
        stack += [base_type(t) for f in entry.get("fields", []) for t in f["types"]]
    return seen


def extract(spec: dict, methods: list[str]) -> dict:
    missing = [name for name in methods if name not in spec["methods"]]
    if missing:
        raise SystemExit(f"served methods missing from the spec: {', '.join(missing)}")
    types = {}
    for name in sorted(reachable_types(spec, methods)):
        entry = spec["types"][name]
        in_union = bool(entry.get("subtype_of"))
        compact = {"fields": [compact_field(f, in_union) for f in entry.get("fields", [])]}
        for key in ("subtypes", "subtype_of"):
            if entry.get(key):
                compact[key] = entry[key]
        types[name] = compact
    return {
        "about": "Extract of the Telegram Bot API spec (PaulSonOfLars/telegram-bot-api-spec, MIT) "
                 "made by tools/extract_bot_api_spec.py for the telegram_sandbox package",
        "version": spec["version"],
        "release_date": spec["release_date"],
        "methods": {
            name: {
                "returns": spec["methods"][name]["returns"],
                "fields": [compact_field(f, False) for f in spec["methods"][name].get("fields", [])],
            }
            for name in methods
        },
        "types": types,
        "other_methods": sorted(set(spec["methods"]) - set(methods)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=pathlib.Path, default=DEFAULT_SPEC, help="full api.json")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="extract to write")
    args = parser.parse_args(argv)
    if not args.spec.is_file():
        parser.error(f"spec not found: {args.spec}")
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    data = extract(spec, list(SERVED_METHODS))
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({len(data['methods'])} methods, {len(data['types'])} types, "
          f"{data['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
