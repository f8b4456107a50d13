"""The error tree is the one map of wire codes and exit statuses."""

from __future__ import annotations

import pytest

from aac_tokend import errors

#: Every class of the tree, by its name in errors.__all__.
CLASSES = [
    cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, errors.AacTokendError)
]

#: The exit statuses cli.py's docstring documents, and what each means.
DOCUMENTED_EXITS = {1, 2, 3, 4, 65, 69, 75, 78}


def own_code(cls: type[errors.AacTokendError]) -> str | None:
    code = cls.__dict__.get("code")
    return code if isinstance(code, str) else None


class TestTheMap:
    """Each class carries its wire code and its exit status."""

    def test_every_class_is_listed_and_exported(self) -> None:
        """Every class of errors.py below the root is in __all__ (so the walk sees them)."""
        defined = {
            obj
            for obj in vars(errors).values()
            if isinstance(obj, type) and issubclass(obj, errors.AacTokendError)
        }
        assert defined == set(CLASSES)

    def test_codes_are_unique(self) -> None:
        """No two classes define the same wire code, so a code names one class."""
        codes = [code for cls in CLASSES if (code := own_code(cls)) is not None]
        assert len(codes) == len(set(codes))

    def test_exit_statuses_are_the_documented_ones(self) -> None:
        """Every class exits with a status cli.py's docstring lists."""
        assert {cls.exit_code for cls in CLASSES} <= DOCUMENTED_EXITS

    @pytest.mark.parametrize(
        ("code", "cls", "status"),
        [
            ("no_token", errors.NoTokenError, 69),
            ("no_token_yet", errors.NoTokenYetError, 75),
            ("unknown_profile", errors.ProfileError, 65),
            ("bad_request", errors.InputError, 65),
            ("config_error", errors.ConfigError, 78),
            ("busy", errors.BusyError, 75),
            ("storage_error", errors.StorageError, 69),
            ("corrupt_state", errors.StateCorruptError, 69),
            ("transient", errors.TransientError, 75),
            ("endpoint_unavailable", errors.EndpointUnavailableError, 75),
            ("alert", errors.AlertError, 69),
            ("chain_in_use", errors.ChainInUseError, 65),
            ("error", errors.AacTokendError, 1),
        ],
    )
    def test_refusals_come_back_as_their_class(
        self, code: str, cls: type[errors.AacTokendError], status: int
    ) -> None:
        """A refusal's code gives back the class (and the exit status) that sent it."""
        exc = errors.from_wire(code, "why it failed")
        assert type(exc) is cls and str(exc) == "why it failed"
        assert (exc.code, exc.exit_code) == (code, status)

    @pytest.mark.parametrize("code", ["unknown_op", "internal_error", ""])
    def test_a_code_no_class_has_is_the_root(self, code: str) -> None:
        """The server's own protocol codes, and codes of a newer daemon, are exit 1."""
        exc = errors.from_wire(code, "m")
        assert type(exc) is errors.AacTokendError and exc.exit_code == 1

    def test_every_class_survives_the_wire(self) -> None:
        """Any error, sent as (its code, its message), comes back with its exit status."""
        for cls in CLASSES:
            sent = errors.AlreadyRunningError(1) if cls is errors.AlreadyRunningError else cls("m")
            back = errors.from_wire(sent.code, str(sent))
            assert isinstance(sent, type(back)), cls
            if own_code(cls) is not None:
                assert type(back) is cls
