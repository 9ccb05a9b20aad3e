"""The least a Redis user needs to run workers and clients, as ACL rules.

docs/reliability.md prints the same rules as one copy-paste ``ACL SETUSER`` line; a test runs
a worker under exactly this user through a handover and a Redis restart. Commands called
inside the Lua scripts are checked against the same rules, so they are listed too.
"""

from __future__ import annotations

# Categories first, then the single commands they leave out: TIME (Redis's clock for
# heartbeats), EXISTS (free leases), DEL (releasing a lease, inside a script), PING.
COMMANDS = (
    "+@stream",
    "+@string",
    "+@hash",
    "+@sortedset",
    "+@scripting",
    "+time",
    "+exists",
    "+del",
    "+ping",
)


def acl_rules(prefix: str = "memnet") -> list[str]:
    """The ACL rules (after ``ACL SETUSER name on >password``) for a deployment's prefix."""
    return ["resetkeys", f"~{prefix}:*", "resetchannels", "-@all", *COMMANDS]


def acl_setuser(user: str, password: str, prefix: str = "memnet") -> list[str]:
    """``ACL SETUSER`` as a command (argument list) creating the minimal user."""
    return ["ACL", "SETUSER", user, "reset", "on", f">{password}", *acl_rules(prefix)]
