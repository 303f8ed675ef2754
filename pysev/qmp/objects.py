"""QEMU's user-creatable objects (``qom/object_interfaces.c``): ``-object`` on the command line,
``object-add`` and ``object-del`` over QMP. pysev has the two that TLS migration names:
``tls-creds-x509`` (``crypto/tlscredsx509.c``; the migration parameter ``tls-creds``) and
``authz-simple`` (``authz/simple.c``; ``tls-authz``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from pysev.migration.tls import AuthzSimple, TlsCredsX509, TlsError
from pysev.qmp.commands import ArgEnum, Command, CommandTable, Schema, Session, generic_error

log = logging.getLogger(__name__)

UserObject = TlsCredsX509 | AuthzSimple

# Each type's properties (qapi/crypto.json TlsCredsX509Properties, qapi/authz.json AuthZSimpleProperties).
OBJECT_TYPES: dict[str, Schema] = {
    "tls-creds-x509": {
        "dir": ("str", False),
        "endpoint": (ArgEnum("client", "server"), False),
        "verify-peer": ("bool", False),
    },
    "authz-simple": {"identity": ("str", True)},
}
_COMMON: Schema = {"qom-type": ("str", True), "id": ("str", True)}
#: object-add's arguments as the command table checks them: every type's properties, each optional here;
#: ``UserObjects.add`` then checks the members of the one type named.
OBJECT_ADD_SCHEMA: Schema = {
    **_COMMON,
    **{name: (spec, False) for props in OBJECT_TYPES.values() for name, (spec, _) in props.items()},
}
_BY_TYPE = {
    t: Command("object-add", lambda args, session: None, {**_COMMON, **props}) for t, props in OBJECT_TYPES.items()
}
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU's id_wellformed
_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def register_commands(table: CommandTable, objects: UserObjects, in_use: Callable[[], set[str]]) -> None:
    """object-add and object-del on ``table``; ``in_use()`` names the objects that cannot be deleted now."""

    def object_add(args: dict, session: Session) -> None:
        objects.add(args)

    def object_del(args: dict, session: Session) -> None:
        objects.delete(args["id"], in_use())

    table.register("object-add", object_add, OBJECT_ADD_SCHEMA)
    table.register("object-del", object_del, {"id": ("str", True)})


class UserObjects:
    """The objects of one VMM, by id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, UserObject] = {}

    def add(self, props: dict[str, Any]) -> UserObject:
        """object-add: create the object (loading its files now, as QEMU does). QmpError on failure."""
        qom_type, oid = props.get("qom-type"), props.get("id")
        check = _BY_TYPE.get(qom_type) if isinstance(qom_type, str) else None
        if check is None:
            raise generic_error(
                f"Parameter 'qom-type' does not accept value '{qom_type}' (pysev has {', '.join(OBJECT_TYPES)})"
            )
        check.validate(props)
        oid = str(oid)
        if not _ID.match(oid):
            raise generic_error("Parameter 'id' expects an identifier")
        self._check_free(oid)
        obj: UserObject
        try:
            if qom_type == "tls-creds-x509":
                obj = TlsCredsX509(
                    oid,
                    props.get("dir"),
                    endpoint=props.get("endpoint", "client"),
                    verify_peer=props.get("verify-peer", True),
                )
            else:
                obj = AuthzSimple(oid, props["identity"])
        except TlsError as err:
            raise generic_error(str(err)) from None
        with self._lock:
            self._check_free(oid)
            self._objects[oid] = obj
        log.info("object added: %r", obj)
        return obj

    def _check_free(self, oid: str) -> None:
        if oid in self._objects:
            raise generic_error(f"attempt to add duplicate property '{oid}' to object (type 'container')")

    def delete(self, oid: str, in_use: set[str]) -> None:
        """object-del: ``in_use`` names the objects a migration parameter or a connection holds."""
        with self._lock:
            if oid not in self._objects:
                raise generic_error(f"object '{oid}' not found")
            if oid in in_use:
                raise generic_error(f"object '{oid}' is in use, can not be deleted")
            del self._objects[oid]
        log.info("object deleted: %s", oid)

    def tls_creds(self, oid: str) -> TlsCredsX509:
        """QEMU's ``migration_tls_get_creds`` lookup."""
        obj = self._objects.get(oid)
        if obj is None:
            raise generic_error(f"No TLS credentials with id '{oid}'")
        if not isinstance(obj, TlsCredsX509):
            raise generic_error(f"Object with id '{oid}' is not TLS credentials")
        return obj

    def authz(self, oid: str) -> AuthzSimple:
        """QEMU's ``qauthz_is_allowed_by_id`` lookup."""
        obj = self._objects.get(oid)
        if obj is None:
            raise generic_error(f"No authorization object with id '{oid}'")
        if not isinstance(obj, AuthzSimple):
            raise generic_error(f"Object '{oid}' is not a QAuthZ subclass")
        return obj


def parse_object_option(text: str) -> dict[str, Any]:
    """``-object TYPE,id=ID,PROP=VALUE,…`` in QEMU's keyval syntax (``,,`` is a literal comma; booleans
    on/off, yes/no, true/false), or a JSON object, as object-add's arguments. ValueError names the fault."""
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError as err:
            raise ValueError(f"not a JSON object: {err}") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        return obj
    items, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            items.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    items.append(current)
    props: dict[str, Any] = {}
    for n, item in enumerate(items):
        key, sep, value = item.partition("=")
        if not sep:
            if n != 0:
                raise ValueError(f"Expected '=' after parameter '{item}'")
            key, value = "qom-type", item
        if not key:
            raise ValueError("Invalid parameter ''")
        if key in props:
            raise ValueError(f"Parameter '{key}' is set more than once")
        props[key] = value
    schema = OBJECT_TYPES.get(props.get("qom-type", ""), {})
    for key, value in props.items():
        if key in schema and schema[key][0] == "bool":
            if value not in _BOOLS:
                raise ValueError(f"Parameter '{key}' expects 'on' or 'off'")
            props[key] = _BOOLS[value]
    return props
