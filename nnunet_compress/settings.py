"""One protocol for every settings object: ``validate() -> self``, ``to_dict()``, ``from_dict()``.

Settings travel: the command line builds them, the plans (or a report) store them as JSON, and a trainer in
another process reads them back. Every class does that round trip the same way, so a plans file is read with the
same rules whichever method wrote it: missing keys take their defaults, an unknown key is an error (a typo would
otherwise fall back to a default without a word), ``None`` means "not set" and is not written, and the values are
checked once, by ``validate``, which returns the object so that construction and checking read as one expression.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Mapping

from nnunet_compress.errors import CompressError


class Settings:
    """Base of the settings dataclasses (mix in before ``@dataclass``'s fields; see the module docstring)."""

    # how error messages name these settings, e.g. "Sauron" -> "unknown Sauron setting(s) ..."
    label: ClassVar[str] = "compression"

    def validate(self):
        """Raise :class:`CompressError` naming the first invalid value and how to fix it; return self."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values by field name; fields that are None (not set) are left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build and validate from a dict such as :meth:`to_dict` wrote; unknown keys are refused."""
        if not isinstance(d, Mapping):
            raise CompressError(f"the {cls.label} settings must be a JSON object, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise CompressError(f"unknown {cls.label} setting(s) {unknown} in the plans; the valid names are "
                                f"{known} (remake the plans with this version of nnunet-compress)")
        return cls(**dict(d)).validate()


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """The one check behind every option with a fixed set of values (the CLI's `choices` use the same tuples)."""
    if value not in choices:
        raise CompressError(f"{option} {value!r} unknown; choose {', '.join(choices)}")


def format_number_tag(value: float) -> str:
    """0.3 -> '0.3', 0.125 -> '0.125': short, filename-safe plans-name suffixes."""
    text = f"{value:g}"
    if os.sep in text or " " in text:
        raise CompressError(f"cannot make a plans name from {value!r}; pass --plans-name")
    return text
