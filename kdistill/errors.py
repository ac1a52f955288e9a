"""Errors a user can act on (the CLI prints their one-line message and exits with code 2), and reading a user's
text files so that a bad byte or character is such an error."""

import re

LINE_BREAK = re.compile(r"\r\n|\r|\n")
"""What ends a line of a user's text file (CoNLL, JSON Lines): \\n (Unix), \\r\\n (Windows) and a lone \\r (old Mac
OS), read the same. Not str.splitlines(): it also splits at U+2028, U+0085 and other characters that JSON allows
unescaped inside strings and that str.split() counts as column separators, not line ends."""


class UserError(Exception):
    """Bad input or configuration: the message names the file, row, column or key to fix."""


class ConfigError(UserError):
    """A recipe or `--set` override is invalid."""


class DataError(UserError):
    """A dataset file is missing, malformed or unusable."""


def decode_utf8(raw: bytes, where: str, error: type[UserError] = UserError) -> str:
    """The text of a user's file (a leading BOM dropped); bytes that are not UTF-8 are an `error` naming the line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1  # e.object lacks the BOM the decoder dropped
        raise error(f"{where}: line {line}: not valid UTF-8 text (byte {e.start + len(raw) - len(e.object)}); "
                    "re-save the file as UTF-8") from None


def encode_utf8(text: str, where: str, error: type[UserError] = UserError) -> bytes:
    """`text` as UTF-8; an unpaired surrogate (what a JSON "\\ud800" escape or an undecodable command-line byte
    gives, and what no tokenizer accepts) is an `error` naming `where` and the character."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{where}: unpaired surrogate U+{ord(text[e.start]):04X} at character {e.start}; a text must be "
                    "valid Unicode (encodable as UTF-8)") from None
