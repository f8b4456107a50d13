"""The typed values of the etcd client: keys, results, leases, compares and txn ops.

Each converts from or to the JSON gateway's wire form in one place (``from_wire``,
``wire``); bytes are base64 there, and 64-bit integers are strings.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass

from .etcd_transport import JsonObject

__all__ = [
    "Compare",
    "DeleteOp",
    "DeleteResult",
    "KeyValue",
    "Lease",
    "LeaseInfo",
    "MemberStatus",
    "Op",
    "PutOp",
    "PutResult",
    "RangeOp",
    "RangeResult",
    "Result",
    "Target",
    "TxnResult",
    "b64",
    "prefix_end",
    "put_body",
    "range_body",
    "range_result",
    "revision_of",
    "unb64",
]


def b64(data: bytes) -> str:
    """Bytes as the gateway wants them."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    """Bytes from the gateway (absent means empty)."""
    return base64.b64decode(str(text)) if text else b""


def prefix_end(key: bytes) -> bytes:
    """The range end that makes ``key`` a prefix: ``key`` with its last byte below 0xff + 1."""
    stripped = key.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # every key
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_wire(cls, kv: JsonObject) -> KeyValue:
        """A KeyValue from the gateway's JSON (zero fields are omitted there)."""
        return cls(
            unb64(kv.get("key")),
            unb64(kv.get("value")),
            int(kv.get("create_revision", 0)),
            int(kv.get("mod_revision", 0)),
            int(kv.get("version", 0)),
            int(kv.get("lease", 0)),
        )


@dataclass(frozen=True)
class RangeResult:
    """The keys found and the store's revision when they were read."""

    kvs: tuple[KeyValue, ...]
    count: int
    revision: int


@dataclass(frozen=True)
class PutResult:
    """The revision of a put."""

    revision: int


@dataclass(frozen=True)
class DeleteResult:
    """How many keys a delete removed, and the revision."""

    deleted: int
    revision: int


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held, the results of the ops that ran, and the revision."""

    succeeded: bool
    responses: tuple[RangeResult | PutResult | DeleteResult, ...]
    revision: int


@dataclass(frozen=True)
class Lease:
    """A granted lease: its id and the TTL etcd actually granted (it may raise ours)."""

    id: int
    ttl: int


@dataclass(frozen=True)
class LeaseInfo:
    """A live lease's remaining and granted TTL, and the keys bound to it if asked."""

    id: int
    ttl: int
    granted_ttl: int
    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class MemberStatus:
    """One member's view: who it is, who it thinks leads, and how far its log is."""

    endpoint: str
    member_id: int
    leader: int
    raft_index: int
    raft_term: int
    version: str
    db_size: int

    @property
    def is_leader(self) -> bool:
        """This member is the leader."""
        return self.leader == self.member_id


class Target(enum.Enum):
    """What a compare looks at."""

    VALUE = "VALUE"
    CREATE = "CREATE"
    MOD = "MOD"
    VERSION = "VERSION"
    LEASE = "LEASE"


class Result(enum.Enum):
    """How a compare compares."""

    EQUAL = "EQUAL"
    NOT_EQUAL = "NOT_EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"


_FIELD = {
    Target.VALUE: "value",
    Target.CREATE: "create_revision",
    Target.MOD: "mod_revision",
    Target.VERSION: "version",
    Target.LEASE: "lease",
}


@dataclass(frozen=True)
class Compare:
    """One compare of a transaction; build it with the class methods."""

    key: bytes
    target: Target
    result: Result
    operand: bytes | int

    @classmethod
    def value(cls, key: bytes, value: bytes, result: Result = Result.EQUAL) -> Compare:
        """The key's value compared with ``value``."""
        return cls(key, Target.VALUE, result, value)

    @classmethod
    def create_revision(cls, key: bytes, rev: int, result: Result = Result.EQUAL) -> Compare:
        """The key's create revision (0: the key does not exist)."""
        return cls(key, Target.CREATE, result, rev)

    @classmethod
    def mod_revision(cls, key: bytes, rev: int, result: Result = Result.EQUAL) -> Compare:
        """The key's last modification revision."""
        return cls(key, Target.MOD, result, rev)

    @classmethod
    def version(cls, key: bytes, version: int, result: Result = Result.EQUAL) -> Compare:
        """The key's version (writes since it was created; 0: absent)."""
        return cls(key, Target.VERSION, result, version)

    @classmethod
    def lease(cls, key: bytes, lease: int, result: Result = Result.EQUAL) -> Compare:
        """The lease the key is bound to (0: none)."""
        return cls(key, Target.LEASE, result, lease)

    def wire(self) -> JsonObject:
        """The gateway's JSON for this compare."""
        operand = b64(self.operand) if isinstance(self.operand, bytes) else str(self.operand)
        return {
            "key": b64(self.key),
            "target": self.target.value,
            "result": self.result.value,
            _FIELD[self.target]: operand,
        }


@dataclass(frozen=True)
class PutOp:
    """A put inside a transaction."""

    key: bytes
    value: bytes
    lease: int | None = None

    def wire(self) -> JsonObject:
        """The gateway's JSON for this op."""
        return {"request_put": put_body(self.key, self.value, self.lease)}


@dataclass(frozen=True)
class DeleteOp:
    """A delete inside a transaction."""

    key: bytes
    prefix: bool = False

    def wire(self) -> JsonObject:
        """The gateway's JSON for this op."""
        return {"request_delete_range": range_body(self.key, self.prefix)}


@dataclass(frozen=True)
class RangeOp:
    """A range read inside a transaction."""

    key: bytes
    prefix: bool = False

    def wire(self) -> JsonObject:
        """The gateway's JSON for this op."""
        return {"request_range": range_body(self.key, self.prefix)}


Op = PutOp | DeleteOp | RangeOp


def put_body(key: bytes, value: bytes, lease: int | None) -> JsonObject:
    body: JsonObject = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def range_body(key: bytes, prefix: bool) -> JsonObject:
    body: JsonObject = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return body


def revision_of(answer: JsonObject) -> int:
    return int(answer.get("header", {}).get("revision", 0))


def range_result(answer: JsonObject, revision: int) -> RangeResult:
    kvs = tuple(KeyValue.from_wire(kv) for kv in answer.get("kvs", ()))
    return RangeResult(kvs, int(answer.get("count", 0)), revision)
