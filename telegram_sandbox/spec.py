"""The Bot API spec extract and the checks it drives: which methods exist, what parameters
they take and how a raw value becomes a typed one.

Spec.load() reads bot_api_spec.json beside this file (made by tools/extract_bot_api_spec.py);
the core asks it for a method's canonical name and for typed parameters (an ApiError with
Telegram's wording when they don't fit), and the tests walk the same file.

Imports errors and media (an InputFile is an Upload); nothing that serves or runs.
"""

import json
import pathlib
import re

from .errors import bad_request
from .media import Upload

SPEC_PATH = pathlib.Path(__file__).resolve().with_name("bot_api_spec.json")

SCALARS = frozenset({"Integer", "Float", "Boolean", "String", "True", "InputFile"})
INTEGER_RE = re.compile(r"-?\d+")
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
EMPTY_IS_A_VALUE = {("setWebhook", "url")}
MISSING_DESCRIPTIONS = {
    "chat_id": "chat_id is empty",
    "text": "message text is empty",
    "photo": "there is no photo in the request",
}


class ShapeError(Exception):
    """A JSON value that does not fit its spec type (the message says where)."""


class Spec:
    """The Bot API spec extract: which methods exist and what their parameters must be."""

    def __init__(self, data: dict):
        self.version = data.get("version", "")
        self.methods: dict[str, dict] = data["methods"]
        self.types: dict[str, dict] = data["types"]
        every_method = [*self.methods, *data.get("other_methods", [])]
        self._by_lower = {name.lower(): name for name in every_method}

    @classmethod
    def load(cls, path: pathlib.Path = SPEC_PATH) -> "Spec":
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def canonical(self, method: str) -> str | None:
        """The spec's spelling of a case-insensitive method name, if the spec has it."""
        return self._by_lower.get(method.lower())

    def parse_params(self, method: str, raw: dict) -> dict:
        """Typed parameters from raw text values and uploads; ApiError when they don't fit."""
        params = {}
        for field in self.methods[method].get("fields", []):
            name = field["name"]
            value = raw.get(name)
            if value == "" and (method, name) in EMPTY_IS_A_VALUE:
                params[name] = ""
                continue
            if value is None or value == "":
                if field["required"]:
                    raise bad_request(MISSING_DESCRIPTIONS.get(name, f'parameter "{name}" is required'))
                continue
            params[name] = self._parse_argument(name, field["types"], value, raw)
        return params

    def _parse_argument(self, name: str, types: list[str], value, raw: dict):
        if isinstance(value, Upload):
            if "InputFile" in types:
                return value
            raise bad_request(f'parameter "{name}" must be {" or ".join(types)}, not a file')
        for type_name in types:
            parsed = _scalar_from_text(type_name, value, raw)
            if parsed is not None:
                return parsed
        complex_types = [t for t in types if t not in SCALARS]
        if not complex_types:
            raise bad_request(f'parameter "{name}" must be of type {" or ".join(types)}')
        label = "reply keyboard markup" if name == "reply_markup" else name.replace("_", " ")
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            raise bad_request(f"can't parse {label} JSON object") from None
        try:
            return self.check(decoded, complex_types)
        except ShapeError as err:
            raise bad_request(f"can't parse {label}: {err}") from None
        except RecursionError:
            raise bad_request(f"can't parse {label}: too deeply nested") from None

    def check(self, value, types: list[str]):
        """The value normalised to the first of types it fits; ShapeError if it fits none."""
        for type_name in types:
            if self._fits(value, type_name):
                return self._check_one(value, type_name)
        objects = [t for t in types if t in self.types and not self.types[t].get("subtypes")]
        if isinstance(value, dict) and len(objects) == 1:
            return self._check_object(value, objects[0], self.types[objects[0]])
        raise ShapeError(f"expected {' or '.join(types)}, got {_json_kind(value)}")

    def _fits(self, value, type_name: str) -> bool:
        if type_name.startswith("Array of "):
            return isinstance(value, list)
        if isinstance(value, str) and type_name in ("Integer", "Float"):
            return INTEGER_RE.fullmatch(value) is not None
        if type_name == "Integer":
            return isinstance(value, int) and not isinstance(value, bool)
        if type_name == "Float":
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if type_name in ("Boolean", "True"):
            return isinstance(value, bool)
        if type_name == "String":
            return isinstance(value, (str, int, float)) and not isinstance(value, bool)
        entry = self.types.get(type_name)
        if entry is None or not isinstance(value, dict):
            return entry is None
        if entry.get("subtypes"):
            return self._subtype_for(value, entry) is not None
        return all(f["name"] in value for f in entry["fields"] if f["required"])

    def _check_one(self, value, type_name: str):
        if type_name.startswith("Array of "):
            item_type = type_name[len("Array of "):]
            return [self.check(item, [item_type]) for item in value]
        if type_name == "Integer":
            return int(value)
        if type_name == "Float":
            return float(value)
        if type_name == "String":
            return value if isinstance(value, str) else json.dumps(value)
        entry = self.types.get(type_name)
        if entry is None or type_name in SCALARS:
            return value
        if entry.get("subtypes"):
            return self._check_one(value, self._subtype_for(value, entry))
        return self._check_object(value, type_name, entry)

    def _check_object(self, value: dict, type_name: str, entry: dict) -> dict:
        out = {}
        for field in entry["fields"]:
            name = field["name"]
            if value.get(name) is None:
                if field["required"]:
                    raise ShapeError(f'field "{name}" of {type_name} is required')
                continue
            if "const" in field and value[name] != field["const"]:
                raise ShapeError(f'field "{name}" of {type_name} must be "{field["const"]}"')
            try:
                out[name] = self.check(value[name], field["types"])
            except ShapeError as err:
                raise ShapeError(f'field "{name}" of {type_name}: {err}') from None
        return out

    def _subtype_for(self, value: dict, entry: dict) -> str | None:
        for subtype in entry["subtypes"]:
            fields = self.types[subtype]["fields"]
            consts = [f for f in fields if "const" in f]
            if consts and all(value.get(f["name"]) == f["const"] for f in consts):
                return subtype
            if not consts and all(f["name"] in value for f in fields if f["required"]):
                return subtype
        return None


def _scalar_from_text(type_name: str, text: str, raw: dict):
    """A top-level text value as type_name, or None if it is not one."""
    if type_name == "String":
        return text
    if type_name == "Integer" and INTEGER_RE.fullmatch(text.strip()):
        return int(text)
    if type_name == "Float":
        try:
            return float(text)
        except ValueError:
            return None
    if type_name in ("Boolean", "True"):
        return BOOLEANS.get(text.strip().lower())
    if type_name == "InputFile" and text.startswith("attach://"):
        attached = raw.get(text[len("attach://"):])
        return attached if isinstance(attached, Upload) else None
    return None


def _json_kind(value) -> str:
    kinds = {bool: "Boolean", int: "Integer", float: "Float", str: "String", list: "Array",
             dict: "Object"}
    return kinds.get(type(value), "null")
