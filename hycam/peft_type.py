"""HyCAM's member of peft's `PeftType` enum.

`peft.utils.peft_types.register_peft_method` accepts only names that `PeftType` already holds, and
peft offers no call to add one; an enum's members live in four places (`_member_map_`,
`_value2member_map_`, `_member_names_` and the class namespace), so the member is put in all four,
exactly as `enum` itself does when it builds the class. Iteration, `PeftType("HYCAM")`,
`PeftType.HYCAM`, pickling and JSON then treat it like any built-in member.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

NAME = "HYCAM"


def _add_member(enum_class: type, name: str):
    if name in enum_class.__members__:  # a re-import, or a peft that ships the member itself
        return enum_class[name]
    member = str.__new__(enum_class, name)  # PeftType mixes in str: its value is the string itself
    member._name_, member._value_ = name, name
    member.__objclass__ = enum_class
    member._sort_order_ = len(enum_class._member_names_)
    enum_class._member_map_[name] = member
    enum_class._value2member_map_[name] = member
    enum_class._member_names_.append(name)
    type.__setattr__(enum_class, name, member)  # EnumType.__setattr__ refuses new members
    return member


HYCAM = _add_member(PeftType, NAME)
