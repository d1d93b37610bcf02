"""The ensemble's members behind one registry: ``create_member(name, ...)``, ``list_members()``."""

from . import members as _members  # noqa: F401  (registers the members)
from ._registry import Member, MemberSpec, WeightsUnavailable, create_member, list_members, member_spec

__all__ = ["Member", "MemberSpec", "WeightsUnavailable", "create_member", "list_members", "member_spec"]
