"""Message text as Telegram stores it: the HTML, MarkdownV2 and Markdown parse modes turned
into entities, bot_command entities, offsets in UTF-16 code units, trimming and length limits.

format_text() is what the Bot API methods call for a text or a caption (an ApiError with
Telegram's "can't parse entities: ..." wording when the text does not parse); the core calls
command_entities() for what users type.

Imports errors only; no spec, no state, nothing that serves.
"""

import re

from .errors import bad_request

COMMAND_RE = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,64}(?:@[A-Za-z0-9_]{3,32})?(?![A-Za-z0-9_@])")
MARKDOWN_V2_RESERVED = frozenset("_*[]()~`>#+-=|{}.!")


class ParseError(Exception):
    """Text that its parse_mode cannot parse (Telegram's "can't parse entities: ...")."""


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def command_entities(text: str) -> list[dict]:
    """bot_command entities for /commands in text, offsets in UTF-16 code units."""
    return [{"type": "bot_command", "offset": utf16_len(text[:m.start()]),
             "length": utf16_len(m.group())} for m in COMMAND_RE.finditer(text)]


class _EntityBuilder:
    """Accumulates output text and entities while a parse-mode parser walks its input."""

    def __init__(self, source: str):
        self.source = source
        self.parts: list[str] = []
        self.position = 0
        self.entities: list[dict] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.position += utf16_len(text)

    def close(self, entity: dict, start: int) -> None:
        if self.position > start:
            self.entities.append({**entity, "offset": start, "length": self.position - start})

    def byte_offset(self, index: int) -> int:
        return len(self.source[:index].encode("utf-8"))

    def result(self) -> tuple[str, list[dict]]:
        return "".join(self.parts), self.entities


HTML_TAG_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9-]*)((?:\s+[^>]*)?)\s*/?>")
HTML_ATTR_RE = re.compile(r"([A-Za-z][\w-]*)(?:\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s\"'>]+)))?")
HTML_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
HTML_ENTITY_RE = re.compile(r"&(#x[0-9A-Fa-f]+|#[0-9]+|[A-Za-z]+);")
HTML_SIMPLE_TAGS = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
    "ins": "underline", "s": "strikethrough", "strike": "strikethrough",
    "del": "strikethrough", "tg-spoiler": "spoiler", "code": "code", "pre": "pre",
}


def parse_html(source: str) -> tuple[str, list[dict]]:
    """Telegram's HTML parse mode: text without tags, and the entities the tags made."""
    out = _EntityBuilder(source)
    stack: list[tuple[str, dict | None, int]] = []
    index = 0
    while index < len(source):
        char = source[index]
        if char == "&":
            match = HTML_ENTITY_RE.match(source, index)
            decoded = _html_entity(match) if match else None
            out.add("&" if decoded is None else decoded)
            index = index + 1 if decoded is None else match.end()
            continue
        if char != "<":
            end = min((i for i in (source.find("<", index), source.find("&", index)) if i >= 0),
                      default=len(source))
            out.add(source[index:end])
            index = end
            continue
        match = HTML_TAG_RE.match(source, index)
        if not match:
            raise ParseError(f'Unsupported start tag "" at byte offset {out.byte_offset(index)}')
        closing, tag, attrs = match.group(1) == "/", match.group(2).lower(), match.group(3)
        if closing:
            _close_html_tag(out, stack, tag, index)
        else:
            stack.append((tag, _html_entity_for(tag, attrs, stack, out.byte_offset(index)),
                          out.position))
        index = match.end()
    if stack:
        raise ParseError(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return out.result()


def _html_entity(match: re.Match) -> str | None:
    """The character an HTML entity stands for; None for names Telegram does not know."""
    name = match.group(1)
    try:
        if name.startswith("#x"):
            return chr(int(name[2:], 16))
        if name.startswith("#"):
            return chr(int(name[1:]))
    except (ValueError, OverflowError):
        return None
    return HTML_NAMED.get(name)


def _html_entity_for(tag: str, attrs: str, stack: list, byte_offset: int) -> dict | None:
    attributes = {m.group(1).lower(): next((g for g in m.groups()[1:] if g is not None), "")
                  for m in HTML_ATTR_RE.finditer(attrs)}
    if tag in HTML_SIMPLE_TAGS:
        entity = {"type": HTML_SIMPLE_TAGS[tag]}
        language = attributes.get("class", "")
        if tag == "code" and stack and stack[-1][0] == "pre" and language.startswith("language-"):
            stack[-1][1]["language"] = language[len("language-"):]
            return None
        return entity
    if tag == "span":
        if attributes.get("class") != "tg-spoiler":
            raise ParseError('Tag "span" must have class "tg-spoiler"')
        return {"type": "spoiler"}
    if tag == "a":
        url = attributes.get("href", "")
        user = re.fullmatch(r"tg://user\?id=(\d+)", url)
        if user:
            return {"type": "text_mention", "user": {"id": int(user.group(1)), "is_bot": False,
                                                     "first_name": ""}}
        return {"type": "text_link", "url": url} if url else None
    if tag == "blockquote":
        return {"type": "expandable_blockquote" if "expandable" in attributes else "blockquote"}
    if tag == "tg-emoji":
        return {"type": "custom_emoji", "custom_emoji_id": attributes.get("emoji-id", "")}
    raise ParseError(f'Unsupported start tag "{tag}" at byte offset {byte_offset}')


def _close_html_tag(out: _EntityBuilder, stack: list, tag: str, index: int) -> None:
    if not stack:
        raise ParseError(f"Unexpected end tag at byte offset {out.byte_offset(index)}")
    open_tag, entity, start = stack.pop()
    if open_tag != tag:
        raise ParseError(f'Unmatched end tag at byte offset {out.byte_offset(index)}, '
                         f'expected "</{open_tag}>", found "</{tag}>"')
    if entity is not None:
        out.close(entity, start)


MARKDOWN_V2_MARKERS = {"*": "bold", "_": "italic", "__": "underline", "~": "strikethrough",
                       "||": "spoiler"}
ENTITY_NAMES = {"bold": "Bold", "italic": "Italic", "underline": "Underline",
                "strikethrough": "Strikethrough", "spoiler": "Spoiler", "text_link": "TextUrl",
                "code": "Code", "pre": "Pre"}


def parse_markdown_v2(source: str) -> tuple[str, list[dict]]:
    """Telegram's MarkdownV2: reserved characters must be escaped, entities must close."""
    out = _EntityBuilder(source)
    stack: list[tuple[str, int, int]] = []  # (marker, output start, source index)
    index = 0
    while index < len(source):
        char = source[index]
        if char == "\\" and index + 1 < len(source) and 0 < ord(source[index + 1]) <= 126:
            out.add(source[index + 1])
            index += 2
        elif char == "`":
            index = _markdown_code(out, source, index, escapes=True)
        elif source.startswith(("__", "||"), index) or char in "*_~":
            marker = source[index:index + 2] if source.startswith(("__", "||"), index) else char
            _toggle_marker(out, stack, marker, index)
            index += len(marker)
        elif char == "[":
            stack.append(("[", out.position, index))
            index += 1
        elif char == "]" and stack and stack[-1][0] == "[":
            index = _markdown_link(out, stack, source, index + 1, escapes=True)
        elif char == ">" and (index == 0 or source[index - 1] == "\n"):
            end = source.find("\n", index)
            line_end = len(source) if end < 0 else end
            text, entities = parse_markdown_v2(source[index + 1:line_end])
            base = out.position
            out.entities += [{**e, "offset": e["offset"] + base} for e in entities]
            out.add(text)
            out.close({"type": "blockquote"}, base)
            index = line_end
        elif char in MARKDOWN_V2_RESERVED:
            raise ParseError(f"Character '{char}' is reserved and must be escaped with the "
                             f"preceding '\\'")
        else:
            out.add(char)
            index += 1
    if stack:
        marker, _, where = stack[-1]
        kind = "text_link" if marker == "[" else MARKDOWN_V2_MARKERS[marker]
        raise ParseError(f"Can't find end of {ENTITY_NAMES[kind]} entity at byte offset "
                         f"{out.byte_offset(where)}")
    return out.result()


def _toggle_marker(out: _EntityBuilder, stack: list, marker: str, index: int) -> None:
    open_markers = [entry[0] for entry in stack]
    if marker in open_markers:
        position = len(open_markers) - 1 - open_markers[::-1].index(marker)
        _, start, _ = stack.pop(position)
        out.close({"type": MARKDOWN_V2_MARKERS[marker]}, start)
    else:
        stack.append((marker, out.position, index))


def _markdown_code(out: _EntityBuilder, source: str, index: int, escapes: bool) -> int:
    """Inline `code` or a ```pre``` block starting at index; returns the index after it."""
    fence = "```" if source.startswith("```", index) else "`"
    body_start = index + len(fence)
    end = body_start
    while True:
        end = source.find(fence, end)
        if end < 0:
            kind = "Pre" if fence == "```" else "Code"
            raise ParseError(f"Can't find end of {kind} entity at byte offset "
                             f"{out.byte_offset(index)}")
        if not (escapes and _escaped(source, end, body_start)):
            break
        end += 1
    body = source[body_start:end]
    entity = {"type": "pre" if fence == "```" else "code"}
    if fence == "```":
        first_line, newline, rest = body.partition("\n")
        if newline and first_line and not any(c.isspace() for c in first_line):
            entity["language"], body = first_line, rest
    if escapes:
        body = re.sub(r"\\(.)", r"\1", body, flags=re.DOTALL)
    start = out.position
    out.add(body)
    out.close(entity, start)
    return end + len(fence)


def _escaped(source: str, index: int, floor: int) -> bool:
    backslashes = 0
    while index - 1 - backslashes >= floor and source[index - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _markdown_link(out: _EntityBuilder, stack: list, source: str, index: int,
                   escapes: bool) -> int:
    """Closes the [text] on top of the stack; a following (url) makes it a text_link."""
    _, start, where = stack.pop()
    if not source.startswith("(", index):
        return index
    end = index + 1
    while True:
        end = source.find(")", end)
        if end < 0:
            raise ParseError(f"Can't find end of a URL at byte offset {out.byte_offset(where)}")
        if not (escapes and _escaped(source, end, index)):
            break
        end += 1
    url = source[index + 1:end]
    if escapes:
        url = re.sub(r"\\(.)", r"\1", url)
    out.close({"type": "text_link", "url": url}, start)
    return end + 1


def parse_markdown(source: str) -> tuple[str, list[dict]]:
    """Telegram's legacy Markdown: *bold* _italic_ `code` ```pre``` [text](url), no nesting."""
    out = _EntityBuilder(source)
    index = 0
    markers = {"*": "bold", "_": "italic"}
    while index < len(source):
        char = source[index]
        if char == "\\" and index + 1 < len(source) and source[index + 1] in "_*`[":
            out.add(source[index + 1])
            index += 2
        elif char == "`":
            index = _markdown_code(out, source, index, escapes=False)
        elif char in markers:
            end = source.find(char, index + 1)
            if end < 0:
                raise ParseError("Can't find end of the entity starting at byte offset "
                                 f"{out.byte_offset(index)}")
            start = out.position
            out.add(source[index + 1:end])
            out.close({"type": markers[char]}, start)
            index = end + 1
        elif char == "[":
            end = source.find("]", index + 1)
            if end < 0:
                raise ParseError("Can't find end of the entity starting at byte offset "
                                 f"{out.byte_offset(index)}")
            stack = [("[", out.position, index)]
            out.add(source[index + 1:end])
            index = _markdown_link(out, stack, source, end + 1, escapes=False)
        else:
            out.add(char)
            index += 1
    return out.result()


PARSE_MODES = {"html": parse_html, "markdownv2": parse_markdown_v2, "markdown": parse_markdown}


def format_text(text: str, parse_mode: str | None, entities: list | None, limit: int,
                too_long: str) -> tuple[str, list[dict]]:
    """Text and entities as Telegram stores them: parsed, trimmed, commands marked, checked."""
    if parse_mode:
        parser = PARSE_MODES.get(parse_mode.lower())
        if parser is None:
            raise bad_request("unsupported parse_mode")
        try:
            text, entities = parser(text)
        except ParseError as err:
            raise bad_request(f"can't parse entities: {err}") from None
    text, entities = _trim(text, list(entities or []))
    taken = [(e["offset"], e["offset"] + e["length"]) for e in entities]
    entities += [c for c in command_entities(text)
                 if all(c["offset"] >= end or c["offset"] + c["length"] <= start
                        for start, end in taken)]
    if len(text) > limit:
        raise bad_request(too_long)
    return text, sorted(entities, key=lambda e: (e["offset"], -e["length"]))


def _trim(text: str, entities: list[dict]) -> tuple[str, list[dict]]:
    entities = [e for e in entities if e["offset"] >= 0 and e["length"] > 0]
    stripped = text.strip()
    if stripped == text:
        return text, [e for e in entities if e["offset"] + e["length"] <= utf16_len(text)]
    lead = utf16_len(text[:len(text) - len(text.lstrip())])
    size = utf16_len(stripped)
    trimmed = []
    for entity in entities:
        start = max(entity["offset"] - lead, 0)
        end = min(entity["offset"] + entity["length"] - lead, size)
        if end > start:
            trimmed.append({**entity, "offset": start, "length": end - start})
    return stripped, trimmed
